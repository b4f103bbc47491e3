"""Build the megatron-core GPTModel chunks for the current layout.

One chunk per virtual pipeline stage, each wrapped in megatron's DistributedDataParallel. The
layer spec follows `model.attention` (`resolve_attention`): megatron's Transformer Engine spec, or
the local spec with `SDPAttention` (torch SDPA) or megatron's own unfused DotProductAttention.
`calculate_per_token_loss=True` is set on the TransformerConfig because the step engine returns
(loss sum, token count) from its loss_func and normalises by the global sum itself (docs/PARALLELISM.md, where ADAPT sits in the schedule).

Final hidden states: the decoder's output on the last stage is already after the final norm
(TransformerBlock applies `final_layernorm` when post_process), and GPTModel passes it straight
to `output_layer`. A forward pre-hook on `output_layer` (`HiddenCapture`) therefore hands the step
engine exactly h_t with no second forward and no copy of megatron's forward code.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import nn

from adapt_pretrain.config import ConfigError
from adapt_pretrain.core.capture import InputCapture
from adapt_pretrain.megatron import cpu_compat
from adapt_pretrain.megatron.config import ModelConfig, ParallelConfig


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and a GPU is present (TE has no CPU kernels)."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # ImportError, or a broken install (missing CUDA libraries)
        return False
    return True


def resolve_attention(choice: str) -> str:
    """`model.attention` -> the implementation used: te, sdpa or local (`auto`: te when available)."""
    if choice == "auto":
        return "te" if transformer_engine_available() else "sdpa"
    if choice == "te" and not transformer_engine_available():
        raise ConfigError("model.attention=te needs transformer_engine importable on a GPU machine; "
                          "use model.attention=sdpa (or auto)")
    return choice


def _fusion_flags(model: ModelConfig, attention: str, gpu: bool) -> dict:
    """megatron's kernel fusions that apply to this model. They are torch.compile-d (or TE)
    kernels, so GPU only; masked-softmax fusion is irrelevant with SDPA / TE attention."""
    if not (gpu and model.fusions):
        return dict(bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                    masked_softmax_fusion=False)
    # megatron's fused GeLU needs a bias unless gated; SwiGLU (silu + GLU) fuses with or without
    bias_act = model.activation == "swiglu" or model.add_bias_linear
    return dict(bias_activation_fusion=bias_act, bias_dropout_fusion=True,
                apply_rope_fusion=attention == "te" and model.position_embedding == "rope",
                masked_softmax_fusion=False)


def _recompute_flags(recompute: str) -> dict:
    if recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return {}


def transformer_config(model: ModelConfig, parallel: ParallelConfig):
    """The megatron TransformerConfig for this model and layout (also drives the schedules)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    gpu = torch.cuda.is_available()
    bf16 = bool(model.bf16 and gpu)
    attention = resolve_attention(model.attention)
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        layernorm_epsilon=model.layernorm_epsilon,
        normalization=model.normalization,
        add_bias_linear=model.add_bias_linear,
        gated_linear_unit=model.activation == "swiglu",
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        use_cpu_initialization=not gpu,
        perform_initialization=True,
        calculate_per_token_loss=True,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=gpu,
        **_fusion_flags(model, attention, gpu),
        **_recompute_flags(model.recompute),
        **cpu_compat.schedule_flags(parallel.interleaved),
    )
    if model.activation == "swiglu":
        import torch.nn.functional as F

        kwargs["activation_func"] = F.silu
    return TransformerConfig(**kwargs)


class LocalNorm:
    """torch LayerNorm / RMSNorm that also works under sequence parallelism.

    megatron-core's local spec (WrappedTorchNorm) refuses sequence parallelism without apex or
    Transformer Engine, yet a per-token norm is correct on a sequence shard as long as its
    parameter gradients are summed over TP: marking the params `sequence_parallel` makes megatron's
    finalize_model_grads do exactly that.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        module = norm_cls(hidden_size, eps=eps)
        for param in module.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return module


def _layer_spec(model: ModelConfig, config, vp_stage: Optional[int]):
    """The GPT layer spec for `model.attention`. Local spec: `sdpa` swaps its core attention for
    `SDPAttention`; with sequence parallelism its norms (and the block's final norm) become
    `LocalNorm`. The TE spec brings its own fused attention, norms and SP support."""
    import copy

    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    attention = resolve_attention(model.attention)
    if attention == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = copy.deepcopy(gpt_layer_specs.get_gpt_layer_local_spec(normalization=model.normalization))
    if attention == "sdpa":
        from adapt_pretrain.megatron.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if not config.sequence_parallel:
        return spec
    spec.submodules.input_layernorm = LocalNorm
    spec.submodules.pre_mlp_layernorm = LocalNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=LocalNorm)


def build_model(model: ModelConfig, parallel: ParallelConfig) -> list[nn.Module]:
    """GPTModel chunks for this rank (one per virtual stage), megatron-DDP wrapped.

    Needs `setup_parallel` first. bf16 on GPU when `model.bf16`; fp32 on CPU.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel

    model.check_layout(parallel)
    config = transformer_config(model, parallel)
    gpu = torch.cuda.is_available()
    chunks: list[nn.Module] = []
    for vp_stage in range(parallel.num_chunks):
        vp = vp_stage if parallel.interleaved else None
        spec = _layer_spec(model, config, vp)
        with cpu_compat.model_construction():
            gpt = GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=model.padded_vocab_size,
                max_sequence_length=model.seq_len,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                parallel_output=True,
                share_embeddings_and_output_weights=model.tie_embeddings,
                position_embedding_type=model.position_embedding,
                vp_stage=vp,
            )
        if gpu:
            gpt.cuda(torch.cuda.current_device())
        if config.bf16:
            # as megatron's trainer does: casts every param (torch norms are built in fp32) to bf16,
            # bf16 inputs on the first stage, fp32 logits out of the last
            from megatron.core.transformer.module import Float16Module

            gpt = Float16Module(config, gpt)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=gpu and parallel.overlap_grad_reduce,
            overlap_param_gather=gpu and parallel.overlap_param_gather,
            use_distributed_optimizer=gpu,
            check_for_nan_in_grad=False,
        )
        chunk = DistributedDataParallel(config=config, ddp_config=ddp_config, module=gpt,
                                        disable_bucketing=vp_stage > 0)
        chunk.broadcast_params()  # identical weights on every DP replica
        chunks.append(chunk)
    return chunks


def unwrap(chunk: nn.Module) -> nn.Module:
    """The GPTModel inside DDP (and, for bf16, Float16Module)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


class HiddenCapture(InputCapture):
    """Grabs the input of `output_layer` (final hidden states, after the final norm) per forward.

    Installed once on the last-stage chunk; the step engine `pop()`s right after calling the model
    inside forward_step, so interleaved schedules (several micro-batches in flight) are safe.
    """

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__(gpt.output_layer, "output_layer did not run: HiddenCapture used on a non-last stage?")

    @classmethod
    def attach(cls, gpt: nn.Module) -> "HiddenCapture":
        """The module's capture, created once (several TrainSteps on one model share it)."""
        capture = getattr(gpt, "_adapt_hidden_capture", None)
        if capture is None:
            capture = cls(gpt)
            gpt._adapt_hidden_capture = capture
        return capture

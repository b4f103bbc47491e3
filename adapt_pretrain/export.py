"""`adapt-pretrain export RUN_DIR --out DIR [--step N]`: a Hugging Face `LlamaForCausalLM` checkpoint.

Why: so a trained model can be evaluated and served with the tools people already use
(transformers, lm-evaluation-harness, vLLM). The checkpoint (any TP/PP/DP layout) is loaded into a
TP = PP = 1 model in this process, its tensors are renamed and split into Llama's, and written as
`model.safetensors` + `config.json` + `generation_config.json`, with the run's tokenizer as
`tokenizer.json` (+ `tokenizer_config.json` for `AutoTokenizer`).

Mapping (megatron-core local layer spec -> Llama):
- `linear_qkv` is stored per query group: [group 0: its q heads, k, v; group 1: ...]. It is cut
  into q_proj (heads in group order), k_proj and v_proj (one head per group each).
- SwiGLU's `linear_fc1` is [gate; up] along the output dimension: gate_proj, up_proj.
- `linear_proj` -> o_proj, `linear_fc2` -> down_proj, the norms by position, tied embeddings ->
  `tie_word_embeddings`. Linear biases (`add_bias_linear`) -> `attention_bias` + `mlp_bias`.
- The padded vocabulary is kept (vocab_size = the model's padded size; the extra rows are never
  a target), so logits match the trained model's exactly.

What Llama cannot express (refused with ExportError naming each option): LayerNorm (Llama has
RMSNorm only), GELU MLPs (Llama's MLP is gated SiLU), learned absolute position embeddings
(Llama uses RoPE), and RoPE variants other than full-dimension, non-interleaved rotation.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any, Optional

import torch

from adapt_pretrain.megatron.config import ModelConfig



class ExportError(ValueError):
    """The run or its model cannot be exported as a Llama checkpoint (the message says why)."""


def unsupported_options(model: ModelConfig) -> list[str]:
    """Every model option a LlamaForCausalLM cannot express, one line each (empty: exportable)."""
    problems = []
    if model.normalization != "RMSNorm":
        problems.append(f"model.normalization={model.normalization!r}: Llama has RMSNorm only")
    if model.activation != "swiglu":
        problems.append(f"model.activation={model.activation!r}: Llama's MLP is SwiGLU (gated SiLU)")
    if model.position_embedding != "rope":
        problems.append(f"model.position_embedding={model.position_embedding!r}: Llama uses RoPE")
    return problems


def _rope_problems(gpt: torch.nn.Module) -> list[str]:
    problems = []
    if float(getattr(gpt, "rotary_percent", 1.0)) != 1.0:
        problems.append(f"rotary_percent={gpt.rotary_percent}: Llama rotates the whole head dimension")
    if bool(getattr(gpt.config, "rotary_interleaved", False)):
        problems.append("rotary_interleaved=True: Llama rotates halves, not interleaved pairs")
    return problems


def llama_config(model: ModelConfig, rope_base: float, eos_id: Optional[int], dtype: torch.dtype) -> dict[str, Any]:
    """config.json fields of the equivalent LlamaConfig."""
    heads = model.num_attention_heads
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": model.padded_vocab_size, "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size, "num_hidden_layers": model.num_layers,
        "num_attention_heads": heads, "num_key_value_heads": model.num_query_groups or heads,
        "head_dim": model.hidden_size // heads, "hidden_act": "silu", "max_position_embeddings": model.seq_len,
        "initializer_range": model.init_method_std, "rms_norm_eps": model.layernorm_epsilon,
        "tie_word_embeddings": model.tie_embeddings, "attention_bias": model.add_bias_linear,
        "mlp_bias": model.add_bias_linear, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(rope_base)},
        "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None, "use_cache": True,
        "dtype": str(dtype).replace("torch.", ""),
    }


def _split_qkv(tensor: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's per-query-group [q heads, k, v] rows -> (q, k, v) rows (works for weight and bias)."""
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.hidden_size // heads
    per_group = heads // groups
    grouped = tensor.reshape(groups, per_group + 2, head_dim, *tensor.shape[1:])
    rest = tensor.shape[1:]
    q = grouped[:, :per_group].reshape(heads * head_dim, *rest)
    k = grouped[:, per_group].reshape(groups * head_dim, *rest)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, *rest)
    return q, k, v


def llama_state_dict(full: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """A single-process GPTModel state dict (reshard.gather_full_state_dict names) -> Llama's names."""
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"],
                                    "model.norm.weight": full["decoder.final_layernorm.weight"]}
    if not model.tie_embeddings:
        out["lm_head.weight"] = full["output_layer.weight"]
    suffixes = ("weight", "bias") if model.add_bias_linear else ("weight",)
    ffn = model.ffn_hidden_size
    for i in range(model.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = full[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = full[src + "pre_mlp_layernorm.weight"]
        for kind in suffixes:
            q, k, v = _split_qkv(full[src + f"self_attention.linear_qkv.{kind}"], model)
            out[dst + f"self_attn.q_proj.{kind}"], out[dst + f"self_attn.k_proj.{kind}"] = q, k
            out[dst + f"self_attn.v_proj.{kind}"] = v
            out[dst + f"self_attn.o_proj.{kind}"] = full[src + f"self_attention.linear_proj.{kind}"]
            fc1 = full[src + f"mlp.linear_fc1.{kind}"]
            out[dst + f"mlp.gate_proj.{kind}"], out[dst + f"mlp.up_proj.{kind}"] = fc1[:ffn], fc1[ffn:]
            out[dst + f"mlp.down_proj.{kind}"] = full[src + f"mlp.linear_fc2.{kind}"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def _tokenizer_path(meta: dict[str, Any], override: Optional[str]) -> tuple[str, Optional[int], Optional[str]]:
    """(tokenizer.json, eos id, eos token) from the run's prepared data dir, or `override`."""
    from adapt_pretrain.data.manifest import Manifest

    if override is not None:
        if not os.path.isfile(override):
            raise ExportError(f"--tokenizer {override}: no such file")
        return override, None, None
    data_dir = str(meta["config"]["data"]["data_dir"])
    try:
        manifest = Manifest.load(data_dir)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise ExportError(f"the run's data dir {data_dir} (for its tokenizer) cannot be read ({exc}); "
                          "pass --tokenizer PATH/tokenizer.json") from exc
    return manifest.tokenizer_path, manifest.eos_id, manifest.raw["tokenizer"].get("eos_token")


def export_checkpoint(ckpt: str, out: str, tokenizer: Optional[str] = None) -> dict[str, Any]:
    """Write the Llama export of checkpoint directory `ckpt` into `out`; returns a summary."""
    from safetensors.torch import save_file

    from adapt_pretrain.checkpointing import read_meta
    from adapt_pretrain.config import from_dict
    from adapt_pretrain.megatron.reshard import gather_full_state_dict
    from adapt_pretrain.trained_model import load_checkpoint_gpt

    meta = read_meta(ckpt)
    model = from_dict(ModelConfig, meta["config"]["model"], "model")
    problems = unsupported_options(model)
    if problems:
        raise ExportError(f"{ckpt}: the model cannot be exported as LlamaForCausalLM:\n  " + "\n  ".join(problems))
    tokenizer_json, eos_id, eos_token = _tokenizer_path(meta, tokenizer)
    model, meta, gpt = load_checkpoint_gpt(ckpt)
    problems = _rope_problems(gpt)
    if problems:
        raise ExportError(f"{ckpt}: the model cannot be exported as LlamaForCausalLM:\n  " + "\n  ".join(problems))
    dtype = next(gpt.parameters()).dtype  # what was trained: bf16 on GPU when model.bf16, else fp32
    full = gather_full_state_dict([gpt])
    tensors = {k: v.to(dtype) for k, v in llama_state_dict(full, model).items()}
    config = llama_config(model, float(getattr(gpt, "rotary_base", 10000)), eos_id, dtype)
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(out, "config.json"), config)
    _write_json(os.path.join(out, "generation_config.json"), {"eos_token_id": eos_id, "bos_token_id": None})
    shutil.copyfile(tokenizer_json, os.path.join(out, "tokenizer.json"))
    _write_json(os.path.join(out, "tokenizer_config.json"),
                {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.seq_len,
                 **({"eos_token": eos_token} if eos_token else {})})
    return {"checkpoint": ckpt, "step": int(meta.get("step", 0)), "out": out, "parameters": sum(t.numel() for t in tensors.values()),
            "dtype": str(dtype).replace("torch.", ""), "layout": meta.get("layout", {})}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapt-pretrain export",
                                description="Export a run's checkpoint as a Hugging Face LlamaForCausalLM "
                                            "(safetensors + config.json + tokenizer.json).")
    p.add_argument("run_dir", help="run directory (holds checkpoints/)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the newest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to ship (default: the run's data dir's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from adapt_pretrain.checkpointing import CheckpointError, find_run_checkpoint

        ckpt = find_run_checkpoint(args.run_dir, args.step)
        summary = export_checkpoint(ckpt, args.out, args.tokenizer)
    except (ExportError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"adapt-pretrain export: {exc}", file=sys.stderr)
        return 2
    finally:
        from adapt_pretrain.megatron.parallel import teardown_parallel

        teardown_parallel()
    print(f"exported step {summary['step']} ({summary['parameters']:,} parameters, {summary['dtype']}) "
          f"to {summary['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

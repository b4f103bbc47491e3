"""Dataclass configs of the megatron step engine: model shape, parallel layout, optimiser.

Each field's rule is declared next to it (adapt_pretrain/config/base.py) and checked at
construction, so a bad value fails at start-up with a message that names the field. Checks that need
the world size live in `adapt_pretrain.layout.Layout.plan`; `ModelConfig.check_layout` checks that
the shape splits over TP/PP/VP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from adapt_pretrain.config.base import ConfigError, Section, choice, flag, integer, number, numbers, optional_integer

ACTIVATIONS = ("gelu", "swiglu")
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")
ATTENTIONS = ("auto", "te", "sdpa", "local")
RECOMPUTES = ("none", "selective", "full")


@dataclass
class ModelConfig(Section):
    """GPT shape and how its layers are built (megatron-core GPTModel).

    ffn_hidden_size defaults to 4 * hidden_size. Dropouts default to 0 (usual for pretraining and
    required for layout-equivalence checks). bf16 applies on GPU only; CPU runs in fp32.
    attention: `te` = megatron's Transformer Engine layer spec; `sdpa` = the local spec with our
    core attention on torch's scaled_dot_product_attention (flash / cuDNN / memory-efficient
    kernels on GPU); `local` = megatron's unfused DotProductAttention (materialises s x s scores);
    `auto` = te when transformer_engine imports on a GPU machine, else sdpa.
    recompute: activation recomputation; `selective` recomputes the core attention, `full`
    every transformer layer (one layer per checkpoint).
    fusions: megatron's fused bias+activation (GeLU/SwiGLU) and bias+dropout+add kernels
    (torch.compile-d) and, with Transformer Engine, the fused rotary embedding; GPU only.
    """

    SECTION = "model"

    vocab_size: int = integer(minimum=1)
    seq_len: int = integer(minimum=1)
    hidden_size: int = integer(minimum=1)
    num_layers: int = integer(minimum=1)
    num_attention_heads: int = integer(minimum=1)
    ffn_hidden_size: Optional[int] = optional_integer(None, minimum=1)
    num_query_groups: Optional[int] = optional_integer(None, minimum=1)
    init_method_std: float = number(0.02, minimum=0)
    hidden_dropout: float = number(0.0, minimum=0, below=1)
    attention_dropout: float = number(0.0, minimum=0, below=1)
    activation: str = choice("gelu", ACTIVATIONS)
    normalization: str = choice("LayerNorm", NORMALIZATIONS)
    position_embedding: str = choice("learned_absolute", POSITION_EMBEDDINGS)
    tie_embeddings: bool = flag(True)
    add_bias_linear: bool = flag(True)
    layernorm_epsilon: float = number(1e-5, minimum=0)
    make_vocab_size_divisible_by: int = integer(128, minimum=1)
    bf16: bool = flag(True)
    attention: str = choice("auto", ATTENTIONS)
    recompute: str = choice("none", RECOMPUTES)
    fusions: bool = flag(True)

    def check(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}")
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"model.num_attention_heads={self.num_attention_heads} must be divisible by "
                              f"model.num_query_groups={self.num_query_groups}")

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    def check_layout(self, parallel: "ParallelConfig") -> None:
        """Raise ConfigError when the shape cannot be split over the given TP/PP/VP layout."""
        tp, pp, vp = parallel.tensor, parallel.pipeline, parallel.virtual_pipeline or 1
        if self.padded_vocab_size % tp:
            raise ConfigError(f"padded vocabulary {self.padded_vocab_size} (model.vocab_size={self.vocab_size} rounded "
                              f"up to model.make_vocab_size_divisible_by={self.make_vocab_size_divisible_by}) must be "
                              f"divisible by parallel.tensor={tp}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % tp or groups % tp:
            raise ConfigError(f"model.num_attention_heads={self.num_attention_heads} (query groups {groups}) "
                              f"must be divisible by parallel.tensor={tp}")
        if self.ffn_hidden_size % tp:
            raise ConfigError(f"model.ffn_hidden_size={self.ffn_hidden_size} must be divisible by parallel.tensor={tp}")
        if self.num_layers % (pp * vp):
            raise ConfigError(f"model.num_layers={self.num_layers} must be divisible by parallel.pipeline * "
                              f"virtual_pipeline = {pp} * {vp}")
        if parallel.sequence_parallel and self.seq_len % tp:
            raise ConfigError(f"model.seq_len={self.seq_len} must be divisible by parallel.tensor={tp} "
                              "with sequence_parallel")


@dataclass
class ParallelConfig(Section):
    """Model-parallel layout. The data-parallel size is not set here: it is derived from the launcher's
    world size (`adapt_pretrain.layout.Layout.plan`).

    virtual_pipeline: model chunks per pipeline rank (interleaved 1F1B); None or 1 = plain 1F1B.
    sequence_parallel: shard activations along the sequence over TP (needs tensor > 1).
    overlap_grad_reduce / overlap_param_gather: overlap the data-parallel gradient reduce-scatter
    with the backward pass and the parameter all-gather with the next forward (megatron's
    distributed optimizer); GPU only, CPU runs keep both off.
    """

    SECTION = "parallel"
    RUNTIME_KEYS = ("data",)

    tensor: int = integer(1, minimum=1)
    pipeline: int = integer(1, minimum=1)
    virtual_pipeline: Optional[int] = optional_integer(None, minimum=1)
    sequence_parallel: bool = flag(False)
    overlap_grad_reduce: bool = flag(True)
    overlap_param_gather: bool = flag(True)

    def check(self) -> None:
        if self.virtual_pipeline == 1:
            self.virtual_pipeline = None
        elif self.virtual_pipeline is not None and self.pipeline < 2:
            raise ConfigError("parallel.virtual_pipeline > 1 needs parallel.pipeline >= 2")
        if self.sequence_parallel and self.tensor < 2:
            self.sequence_parallel = False  # megatron semantics: meaningless without TP

    @property
    def interleaved(self) -> bool:
        return self.virtual_pipeline is not None

    @property
    def num_chunks(self) -> int:
        return self.virtual_pipeline or 1


@dataclass
class OptimConfig(Section):
    """AdamW + warm-up + decay (megatron OptimizerParamScheduler)."""

    SECTION = "optim"

    lr: float = number(3e-4, minimum=0)
    min_lr: float = number(3e-5, minimum=0)
    weight_decay: float = number(0.1, minimum=0)
    betas: tuple[float, float] = numbers((0.9, 0.95), count=2, minimum=0, below=1)
    eps: float = number(1e-8, minimum=0)
    clip_grad: float = number(1.0, minimum=0)
    warmup_steps: int = integer(0, minimum=0)
    total_steps: int = integer(1000, minimum=1)
    lr_decay_style: str = choice("cosine", LR_DECAY_STYLES)

    def check(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be <= optim.lr={self.lr}")
        if self.warmup_steps >= self.total_steps:  # megatron's scheduler asserts decay steps > warm-up steps
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be < optim.total_steps={self.total_steps}")

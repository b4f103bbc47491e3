"""Dataclass configs of the megatron step engine: model shape, parallel layout, optimiser.

Validation happens at construction so a bad value fails at start-up with a message that names the
field; checks that need the world size (divisibility by TP/PP/VP) happen in `ParallelConfig.resolve`
and `ModelConfig.check_layout`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from adapt_pretrain.config import ConfigError

ACTIVATIONS = ("gelu", "swiglu")
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")
ATTENTIONS = ("auto", "te", "sdpa", "local")
RECOMPUTES = ("none", "selective", "full")


def _positive_int(section: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{section}.{name}={value!r} must be a positive integer")


def _non_negative(section: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{section}.{name}={value!r} must be a number >= 0")
    return float(value)


@dataclass
class ModelConfig:
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

    vocab_size: int
    seq_len: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: Optional[int] = None
    num_query_groups: Optional[int] = None
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation: str = "gelu"
    normalization: str = "LayerNorm"
    position_embedding: str = "learned_absolute"
    tie_embeddings: bool = True
    add_bias_linear: bool = True
    layernorm_epsilon: float = 1e-5
    make_vocab_size_divisible_by: int = 128
    bf16: bool = True
    attention: str = "auto"
    recompute: str = "none"
    fusions: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "hidden_size", "num_layers", "num_attention_heads",
                     "make_vocab_size_divisible_by"):
            _positive_int("model", name, getattr(self, name))
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        _positive_int("model", "ffn_hidden_size", self.ffn_hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}")
        if self.num_query_groups is not None:
            _positive_int("model", "num_query_groups", self.num_query_groups)
            if self.num_attention_heads % self.num_query_groups:
                raise ConfigError(f"model.num_attention_heads={self.num_attention_heads} must be divisible by "
                                  f"model.num_query_groups={self.num_query_groups}")
        self.init_method_std = _non_negative("model", "init_method_std", self.init_method_std)
        for name in ("hidden_dropout", "attention_dropout"):
            value = _non_negative("model", name, getattr(self, name))
            if value >= 1:
                raise ConfigError(f"model.{name}={value} must be in [0, 1)")
            setattr(self, name, value)
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation={self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"model.normalization={self.normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ConfigError(f"model.position_embedding={self.position_embedding!r}; "
                              f"choose one of {', '.join(POSITION_EMBEDDINGS)}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"model.attention={self.attention!r}; choose one of {', '.join(ATTENTIONS)}")
        if self.recompute not in RECOMPUTES:
            raise ConfigError(f"model.recompute={self.recompute!r}; choose one of {', '.join(RECOMPUTES)}")
        for name in ("tie_embeddings", "add_bias_linear", "bf16", "fusions"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name}={getattr(self, name)!r} must be true or false")

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
class ParallelConfig:
    """Model-parallel layout. `data` is derived: world_size / (tensor * pipeline).

    virtual_pipeline: model chunks per pipeline rank (interleaved 1F1B); None or 1 = plain 1F1B.
    sequence_parallel: shard activations along the sequence over TP (needs tensor > 1).
    overlap_grad_reduce / overlap_param_gather: overlap the data-parallel gradient reduce-scatter
    with the backward pass and the parameter all-gather with the next forward (megatron's
    distributed optimizer); GPU only, CPU runs keep both off.
    """

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    sequence_parallel: bool = False
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    data: Optional[int] = None  # set by resolve(); not a user setting

    def __post_init__(self) -> None:
        _positive_int("parallel", "tensor", self.tensor)
        _positive_int("parallel", "pipeline", self.pipeline)
        if self.virtual_pipeline is not None:
            _positive_int("parallel", "virtual_pipeline", self.virtual_pipeline)
            if self.virtual_pipeline == 1:
                self.virtual_pipeline = None
            elif self.pipeline < 2:
                raise ConfigError("parallel.virtual_pipeline > 1 needs parallel.pipeline >= 2")
        for name in ("sequence_parallel", "overlap_grad_reduce", "overlap_param_gather"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"parallel.{name}={getattr(self, name)!r} must be true or false")
        if self.sequence_parallel and self.tensor < 2:
            self.sequence_parallel = False  # megatron semantics: meaningless without TP

    @property
    def interleaved(self) -> bool:
        return self.virtual_pipeline is not None

    @property
    def num_chunks(self) -> int:
        return self.virtual_pipeline or 1

    def resolve(self, world_size: int) -> "ParallelConfig":
        """Derive `data` from the world size; clear error if the layout does not divide it."""
        model_parallel = self.tensor * self.pipeline
        if world_size % model_parallel:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor * parallel.pipeline "
                              f"= {self.tensor} * {self.pipeline}")
        self.data = world_size // model_parallel
        return self


@dataclass
class OptimConfig:
    """AdamW + warm-up + decay (megatron OptimizerParamScheduler)."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    total_steps: int = 1000
    lr_decay_style: str = "cosine"

    def __post_init__(self) -> None:
        self.lr = _non_negative("optim", "lr", self.lr)
        self.min_lr = _non_negative("optim", "min_lr", self.min_lr)
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be <= optim.lr={self.lr}")
        self.weight_decay = _non_negative("optim", "weight_decay", self.weight_decay)
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"optim.betas={self.betas!r} must be two numbers in [0, 1)")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _non_negative("optim", "eps", self.eps)
        self.clip_grad = _non_negative("optim", "clip_grad", self.clip_grad)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps!r} must be an integer >= 0")
        _positive_int("optim", "total_steps", self.total_steps)
        if self.warmup_steps >= self.total_steps:  # megatron's scheduler asserts decay steps > warm-up steps
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be < optim.total_steps={self.total_steps}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"optim.lr_decay_style={self.lr_decay_style!r}; choose one of {', '.join(LR_DECAY_STYLES)}")

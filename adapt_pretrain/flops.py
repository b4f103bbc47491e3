"""Training FLOPs of a GPT: the formula behind tokens/s -> TFLOP/s -> MFU.

Counting convention (the usual one; a multiply-add is 2 FLOPs):
- forward FLOPs per token = 2 * (matmul parameters) + attention: per layer QK^T and AV each cost
  2 * seq_len * hidden per token (causal masking not discounted, as in Megatron's accounting);
- matmul parameters per layer: QKV + output projection 4*h^2 (with grouped-query attention the
  K and V projections shrink by num_query_groups / heads), MLP 2*h*ffn (3*h*ffn for SwiGLU);
  plus the output layer h*V (embedding lookups are free);
- training = 3 x forward (backward costs two forwards).
What each reweighting method spends on scoring on top of this is the experiment harness's business
(`adapt_pretrain.experiments.methods.costs`).

`throughput_metrics` turns one step's token count and time into the logged throughput:
train/tokens_per_s, train/tflops_per_device (training_flops / seconds / devices) and train/mfu
(that over the device's peak dense bf16 FLOP/s; only for devices in `PEAK_BF16_FLOPS`, never a
guessed peak).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

# Peak dense (no sparsity) bf16 tensor-core FLOP/s per device, from the vendors' data sheets, matched
# against the device name (first match wins: specific names before their families).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),   # SXM / NVL
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("MI300X", 1307e12),
)


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    seq_len: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    num_query_groups: int | None = None
    swiglu: bool = False

    @classmethod
    def from_model_config(cls, model) -> "ModelShape":
        return cls(model.vocab_size, model.seq_len, model.hidden_size, model.num_layers, model.num_attention_heads,
                   model.ffn_hidden_size, model.num_query_groups, getattr(model, "activation", "gelu") == "swiglu")


# Fields a Hugging Face model config needs for a ModelShape; without any of them no FLOPs are counted.
HF_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# Mixture-of-experts configs: the dense formula would overcount; no FLOPs for them.
HF_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def shape_from_hf_config(config: Any, seq_len: int) -> Optional[ModelShape]:
    """The ModelShape of a Hugging Face causal LM's config (`model.config`) at `seq_len`, or None when
    the config lacks a field of HF_SHAPE_FIELDS or is a mixture of experts (then report tokens/s
    only, never a guessed TFLOP/s). `hidden_act: silu` is a Llama-style gated MLP (SwiGLU: three
    h x ffn matrices); `num_key_value_heads` gives grouped-query attention."""
    values = {name: getattr(config, name, None) for name in HF_SHAPE_FIELDS}
    if any(not isinstance(v, int) or v <= 0 for v in values.values()):
        return None
    if any(getattr(config, name, None) for name in HF_EXPERT_FIELDS):
        return None
    return ModelShape(vocab_size=values["vocab_size"], seq_len=int(seq_len), hidden_size=values["hidden_size"],
                      num_layers=values["num_hidden_layers"], num_attention_heads=values["num_attention_heads"],
                      ffn_hidden_size=values["intermediate_size"],
                      num_query_groups=getattr(config, "num_key_value_heads", None),
                      swiglu=getattr(config, "hidden_act", None) in ("silu", "swish"))


def matmul_params(shape: ModelShape) -> int:
    h, heads = shape.hidden_size, shape.num_attention_heads
    kv_fraction = (shape.num_query_groups or heads) / heads
    attention = h * h * (2 + 2 * kv_fraction)  # Q and output projection, K and V (shrunk by GQA)
    mlp = (3 if shape.swiglu else 2) * h * shape.ffn_hidden_size
    return int(shape.num_layers * (attention + mlp) + h * shape.vocab_size)


def forward_flops_per_token(shape: ModelShape) -> int:
    attention_scores = shape.num_layers * 2 * (2 * shape.seq_len * shape.hidden_size)
    return 2 * matmul_params(shape) + attention_scores


def training_flops(shape: ModelShape, tokens: int) -> int:
    return 3 * forward_flops_per_token(shape) * tokens


def peak_bf16_flops(device_name: Optional[str]) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one device by its name (e.g. torch.cuda.get_device_name()); None for
    CPU, no name or a device not in PEAK_BF16_FLOPS (then no MFU is reported)."""
    if not device_name:
        return None
    name = device_name.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in name:
            return peak
    return None


def current_device_name() -> Optional[str]:
    """The CUDA device's name, or None on CPU (no MFU there)."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def throughput_metrics(tokens: int, seconds: float, shape: ModelShape, num_devices: int,
                       device_name: Optional[str] = None) -> dict[str, float]:
    """One step's throughput for the log: train/tokens_per_s (all devices together),
    train/tflops_per_device (training_flops(shape, tokens) / seconds / num_devices / 1e12) and, when
    the device's peak is known, train/mfu (achieved / peak FLOP/s per device, a fraction in [0, 1]).

    tokens: the tokens the model processed this step over all devices (global batch x seq_len: the
    FLOPs are spent on padding and unmasked positions too); seconds: the step's wall time;
    num_devices: the devices sharing the work (the world size); device_name: for the peak (None: no MFU).
    """
    if num_devices < 1:
        raise ValueError(f"num_devices={num_devices} must be >= 1")
    if not seconds > 0:
        raise ValueError(f"seconds={seconds} must be > 0 (the step's wall time)")
    flops_per_device = training_flops(shape, tokens) / seconds / num_devices
    out = {"train/tokens_per_s": tokens / seconds, "train/tflops_per_device": flops_per_device / 1e12}
    peak = peak_bf16_flops(device_name)
    if peak is not None:
        out["train/mfu"] = flops_per_device / peak
    return out

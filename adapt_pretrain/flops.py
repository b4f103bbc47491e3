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
"""
from __future__ import annotations

from dataclasses import dataclass


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

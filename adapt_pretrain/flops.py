"""FLOPs accounting: training compute plus each reweighting method's scoring cost (issue 6).

Counting convention (the usual one; a multiply-add is 2 FLOPs):
- forward FLOPs per token = 2 * (matmul parameters) + attention: per layer QK^T and AV each cost
  2 * seq_len * hidden per token (causal masking not discounted, as in Megatron's accounting);
- matmul parameters per layer: QKV + output projection 4*h^2 (with grouped-query attention the
  K and V projections shrink by num_query_groups / heads), MLP 2*h*ffn (3*h*ffn for SwiGLU);
  plus the output layer h*V (embedding lookups are free);
- training = 3 x forward (backward costs two forwards).
ADAPT's own cost reuses the training forward's hidden states: position-weighted pooling (2h per
token), the score (2h per group) and the anchor re-encoding forward every refresh_interval steps.
The paper's accounting (8N per token, a second forward) is reported next to ours for comparison.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


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


@dataclass
class FlopsReport:
    """Per-run compute: training plus the method's scoring, split by where it is spent."""

    training: int
    online_scoring: int = 0      # pooling + scores during training steps
    anchor_refresh: int = 0      # forward passes over the anchor set
    prepare_scoring: int = 0     # embedding passes or BM25 work done when shards are prepared
    paper_convention: int = 0    # what the paper's 8N-per-token accounting would charge

    @property
    def total(self) -> int:
        return self.training + self.online_scoring + self.anchor_refresh + self.prepare_scoring

    def as_dict(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(asdict(self))
        out["total"] = self.total
        out["overhead_ratio"] = self.total / self.training if self.training else 0.0
        return out


def adapt_flops(shape: ModelShape, tokens: int, groups: int, steps: int, refresh_interval: int,
                anchor_tokens: int) -> FlopsReport:
    """ADAPT (embed signal) on top of training: pooling, scoring and anchor refreshes at steps 0, R, 2R..."""
    h = shape.hidden_size
    refreshes = (steps - 1) // refresh_interval + 1 if steps > 0 else 0
    params = matmul_params(shape)
    return FlopsReport(
        training=training_flops(shape, tokens),
        online_scoring=2 * h * tokens + 2 * h * groups,
        anchor_refresh=refreshes * forward_flops_per_token(shape) * anchor_tokens,
        paper_convention=8 * params * tokens,
    )


def embedding_selection_flops(shape: ModelShape, candidate_tokens: int) -> int:
    """Offline top-k by embedding similarity: one forward over every candidate token at prepare time."""
    return forward_flops_per_token(shape) * candidate_tokens


def bm25_flops(candidate_tokens: int, num_anchors: int) -> int:
    """BM25 against the anchors: about one weighted term lookup (2 ops) per candidate token per anchor."""
    return 2 * candidate_tokens * num_anchors

"""FLOPs per compared run: training compute plus what the method spends on scoring.

All runs train the same number of tokens with the same model, so `training` is equal by design;
the table reports `total / training` as each method's overhead. Conventions are those of
`adapt_pretrain.flops` (multiply-add = 2 FLOPs, training = 3 forwards).
ADAPT's own cost reuses the training forward's hidden states: position-weighted pooling (2h per
token), the score (2h per group) and the anchor re-encoding forward every refresh_interval steps.
The paper's accounting (8N per token, a second forward) is reported next to ours for comparison.
- adapt (embed): pooling + scoring per token/group and the anchor re-encoding forwards.
- adapt-bm25 / topk-bm25: the BM25 pass over every candidate (training) token at prepare time.
- topk-embed: training the proxy model plus one forward over the candidates and anchors.
- linupper: per-group loss sums and token weights (2 FLOPs per token) on top of training.
- static-mix: nothing here: the weights are given (a DoReMi/RegMix search would cost its proxies).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from adapt_pretrain.experiments.methods.plan import CompareConfig, RunSpec, tokens_per_step
from adapt_pretrain.experiments.methods.presets import MethodPreset, get_preset
from adapt_pretrain.flops import ModelShape, forward_flops_per_token, matmul_params, training_flops


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


@dataclass(frozen=True)
class ScoringWork:
    """Sizes of the offline scoring work of one comparison (shared by its runs)."""

    candidate_tokens: int = 0   # tokens of the full training split (what BM25 / embeddings score)
    num_anchors: int = 0
    anchor_tokens: int = 0      # anchor tokens one encoding forward sees (truncated to seq_len)
    proxy_tokens: int = 0       # tokens trained by the top-k-embed proxy model
    embed_tokens: int = 0       # tokens forwarded by the top-k-embed scoring pass (docs + anchors)


def run_flops(preset: MethodPreset, shape: ModelShape, tokens: int, steps: int, groups: int,
              refresh_interval: int, work: ScoringWork) -> FlopsReport:
    """FLOPs of one run of `preset` that trained `tokens` tokens in `steps` steps over `groups` token groups."""
    overrides = set(preset.overrides)
    if "adapt.policy=adapt" in overrides and "adapt.signal=embed" in overrides:
        return adapt_flops(shape, tokens, groups, steps, refresh_interval, work.anchor_tokens)
    report = FlopsReport(training=training_flops(shape, tokens))
    if "adapt.signal=bm25" in overrides or preset.selection == "bm25":
        report.prepare_scoring = bm25_flops(work.candidate_tokens, work.num_anchors)
    elif preset.selection == "embed":
        report.prepare_scoring = training_flops(shape, work.proxy_tokens) + embedding_selection_flops(shape, work.embed_tokens)
    if "adapt.policy=linupper" in overrides:
        report.online_scoring = 2 * tokens
    return report


def estimate(cfg: CompareConfig, specs: list[RunSpec], todo: list[RunSpec], tflops: float) -> list[str]:
    """Size of the plan in the harness's FLOPs accounting: tokens, passes and training FLOPs per run,
    and the training time of all runs (and of those still to do) at `tflops` TFLOP/s."""
    from adapt_pretrain.config import RunConfig
    from adapt_pretrain.data.manifest import Manifest

    full = int(Manifest.load(cfg.data_dir).raw["splits"]["train"]["tokens"])
    lines, flops_of = [], {}
    for spec in specs:
        raw = {**spec.config, "data": {**spec.config["data"], "data_dir": cfg.data_dir}}  # variants may not exist yet
        rc = RunConfig.from_dict(raw)
        steps, per_step = tokens_per_step(raw)
        shape = ModelShape.from_model_config(rc.model)
        flops_of[spec.run_dir] = training_flops(shape, steps * per_step)
        if not lines:
            lines.append(f"model: {matmul_params(shape):,} matmul parameters (output layer included), "
                         f"{rc.model.vocab_size * rc.model.hidden_size:,} in the token embedding; "
                         f"training split: {full:,} tokens")
        if spec.seed == specs[0].seed:  # one line per method
            variant = get_preset(spec.method).data_variant
            data_tokens = full * (cfg.selection.fraction if variant and variant.startswith("topk-") else 1.0)
            lines.append(f"{spec.method}: {steps} steps x {per_step:,} tokens = {steps * per_step:,} tokens "
                         f"({steps * per_step / data_tokens:.1f} passes over its training data), "
                         f"{flops_of[spec.run_dir]:.3g} training FLOPs per run")
    total, rest = sum(flops_of.values()), sum(flops_of[s.run_dir] for s in todo)
    lines.append(f"all {len(specs)} runs: {total:.3g} training FLOPs = {total / (tflops * 1e12):.0f} s at {tflops:g} TFLOP/s "
                 f"({len(todo)} to do: {rest / (tflops * 1e12):.0f} s), not counting start-up, scoring and evaluation")
    return lines

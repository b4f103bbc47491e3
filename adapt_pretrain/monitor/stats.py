"""Weight-curriculum statistics as reducible partial sums (docs/MONITORING.md: make the curriculum visible).

Why partial sums: the trainer sees only its own data-parallel shard (and, with pipeline
parallelism, only the last stage sees weights). Every metric here is a function of a few sums
(and two maxima), so each rank builds them from its local groups, they are added over
micro-batches and all-reduced over data-parallel ranks, and one finaliser turns them into metrics.
The result equals a single-process computation over the concatenated global batch, up to float
reduction order.

Layout of one step's reduction (float64, so token counts stay exact):
- `sums` [size]: SUM-reduced. Global counters, per-domain counters and two fixed-range histograms.
- `maxes` [4]: MAX-reduced: (w_max, -w_min, s_max, -s_min); minima via negation so one MAX
  collective covers both.

Quantiles come from the weight histogram (fixed bins over `weight_range`, values outside are
clamped into the edge bins): linear interpolation inside the bin, then clipped to the exact
[min, max]. The error is at most one bin width ((hi - lo) / num_bins); that is the price of a
reduction that is a plain sum instead of an all-gather of every weight.

Bins: 512 by default (W&B's largest histogram). Weights of a real run often spread over a few
hundredths of [0, 1] (early training: thousandths); with 64 bins every group of such a step falls
into one bin and the heat map shows one flat block. `finalize` hands out only the populated span
of the bins (on the fixed grid), so the log stays small however fine the grid.

Cost: one one-hot matmul and one bincount over G groups and a handful of reductions, no host sync
until `finalize` (call it only on logging steps).
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

Tensor = torch.Tensor
ReduceFn = Callable[[Tensor], Tensor]

QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)

# Global counters at the head of `sums`.
_N, _SW, _SW2, _SS, _SS2, _T, _WT, _L, _WL = range(9)
_NUM_GLOBAL = 9
# Per-domain columns: groups, sum w, tokens, sum w*tokens, loss sum, sum w*loss (columns of the terms matrix).
_DOMAIN_TERMS = [_N, _SW, _T, _WT, _L, _WL]
_D_COLS = len(_DOMAIN_TERMS)


@dataclass(frozen=True)
class StatsLayout:
    """Static shape of the reduction; identical on every rank, fixed for a run.

    weight_range / score_range: fixed histogram ranges. Sigmoid weights lie in [w_min, min(w_max, 1)];
    cosine scores in [-1, 1]; z-scored BM25 scores want something like (-4, 4).
    """

    num_domains: int
    num_bins: int = 512
    weight_range: tuple[float, float] = (0.0, 1.0)
    score_range: tuple[float, float] = (-1.0, 1.0)

    def __post_init__(self) -> None:
        if self.num_domains < 1 or self.num_bins < 1:
            raise ValueError("StatsLayout needs num_domains >= 1 and num_bins >= 1")
        for name, (lo, hi) in (("weight_range", self.weight_range), ("score_range", self.score_range)):
            if not hi > lo:
                raise ValueError(f"StatsLayout.{name}={(lo, hi)} must have hi > lo")

    @classmethod
    def for_adapt(cls, cfg: Any, num_domains: int) -> "StatsLayout":
        """The layout both adapters use for an `adapt` config: weights over [w_min, min(w_max, 1)]
        for sigmoid weights (LinUpper: up to max(w_max, 1)); scores over (-1, 1) for the cosine
        (`embed`) signal, (-4, 4) for z-scored static scores."""
        high = min(cfg.w_max, 1.0) if cfg.policy == "adapt" else max(cfg.w_max, 1.0)
        return cls(num_domains=max(num_domains, 1), weight_range=(cfg.w_min, max(high, cfg.w_min + 1e-6)),
                   score_range=(-1.0, 1.0) if cfg.signal == "embed" else (-4.0, 4.0))

    @property
    def domain_offset(self) -> int:
        return _NUM_GLOBAL

    @property
    def weight_hist_offset(self) -> int:
        return _NUM_GLOBAL + _D_COLS * self.num_domains

    @property
    def score_hist_offset(self) -> int:
        return self.weight_hist_offset + self.num_bins

    @property
    def size(self) -> int:
        return self.score_hist_offset + self.num_bins

    def edges(self, which: str) -> list[float]:
        lo, hi = self.weight_range if which == "weights" else self.score_range
        return [lo + (hi - lo) * i / self.num_bins for i in range(self.num_bins + 1)]


@dataclass
class PartialStats:
    """Reducible sums of one rank's micro-batch(es). Combine micro-batches with `merge`."""

    layout: StatsLayout
    sums: Tensor  # float64 [layout.size], SUM-reduced
    maxes: Tensor  # float64 [4]: w_max, -w_min, s_max, -s_min; MAX-reduced

    def merge(self, other: "PartialStats") -> "PartialStats":
        """Sum of two partials (e.g. two micro-batches of the same step)."""
        return PartialStats(self.layout, self.sums + other.sums, torch.maximum(self.maxes, other.maxes))

    def reduce(self, all_reduce_sum: ReduceFn, all_reduce_max: ReduceFn) -> "PartialStats":
        """Reduce with caller-supplied collectives; each takes a tensor and returns the reduced one."""
        return PartialStats(self.layout, all_reduce_sum(self.sums.clone()), all_reduce_max(self.maxes.clone()))

    def all_reduce(self, group: "torch.distributed.ProcessGroup | None" = None) -> "PartialStats":
        """Reduce over a torch.distributed group (the data-parallel group); a no-op when not initialised."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self

        def _op(op: "dist.ReduceOp") -> ReduceFn:
            def run(t: Tensor) -> Tensor:
                dist.all_reduce(t, op=op, group=group)
                return t
            return run

        return self.reduce(_op(dist.ReduceOp.SUM), _op(dist.ReduceOp.MAX))


def empty_stats(layout: StatsLayout, device: torch.device | str = "cpu") -> PartialStats:
    """The neutral element of `merge` (zero sums, -inf maxima)."""
    return PartialStats(layout, torch.zeros(layout.size, dtype=torch.float64, device=device),
                        torch.full((4,), float("-inf"), dtype=torch.float64, device=device))


def _bin_index(values: Tensor, lo: float, hi: float, bins: int) -> Tensor:
    """Fixed-bin index; out-of-range values are clamped into the edge bins."""
    return ((values - lo) * (bins / (hi - lo))).floor().clamp_(0, bins - 1).long()


def _histogram2(w: Tensor, s: Tensor, layout: StatsLayout) -> Tensor:
    """Weight counts then score counts ([2 * bins]) in one bincount (integer counts: exact and
    deterministic on any device)."""
    b = layout.num_bins
    idx = torch.cat([_bin_index(w, *layout.weight_range, b), _bin_index(s, *layout.score_range, b) + b])
    return torch.bincount(idx, minlength=2 * b).to(torch.float64)


def populated_span(counts: Sequence[float], lo: float, hi: float) -> tuple[list[float], list[float]]:
    """(counts, edges) of a fixed-bin histogram over [lo, hi], cut to the bins from the first to the
    last non-empty one (same grid, fewer bins); an all-empty histogram is returned whole."""
    bins = len(counts)
    nonzero = [i for i, c in enumerate(counts) if c > 0]
    first, last = (nonzero[0], nonzero[-1] + 1) if nonzero else (0, bins)
    return list(counts[first:last]), [lo + (hi - lo) * i / bins for i in range(first, last + 1)]


def partial_stats(
    layout: StatsLayout,
    weights: Tensor,
    scores: Tensor,
    group_tokens: Tensor,
    group_domain: Tensor,
    group_loss: Tensor,
) -> PartialStats:
    """Partial sums of one micro-batch from per-group tensors (all [G], any device).

    weights: ADAPT weight per group; scores: similarity score per group; group_tokens: number of
    loss-carrying tokens in the group; group_domain: domain index in [0, num_domains) (others count
    in the global metrics only, so a bad label cannot crash training);
    group_loss: unweighted cross-entropy summed over the group's tokens. Inputs are detached.
    """
    w = weights.detach().reshape(-1).to(torch.float64)
    s = scores.detach().reshape(-1).to(torch.float64)
    t = group_tokens.detach().reshape(-1).to(torch.float64)
    l = group_loss.detach().reshape(-1).to(torch.float64)
    dom = group_domain.detach().reshape(-1).long()
    if not (w.numel() == s.numel() == t.numel() == l.numel() == dom.numel()):
        raise ValueError("weights, scores, group_tokens, group_domain, group_loss must all have G entries")
    if w.numel() == 0:
        return empty_stats(layout, w.device)
    # One [G, 9] matrix of per-group terms; column sums give the globals, a one-hot matmul the per-domain
    # sums (few large ops instead of many small ones: per-op overhead dominates at these sizes).
    wt, wl = w * t, w * l
    terms = torch.stack([torch.ones_like(w), w, w * w, s, s * s, t, wt, l, wl], dim=1)
    glob = terms.sum(0)
    nd = layout.num_domains
    dom = torch.where((dom >= 0) & (dom < nd), dom, nd)  # unknown domains: globals only, no domain row
    onehot = torch.nn.functional.one_hot(dom, nd + 1)[:, :nd].to(torch.float64)  # [G, D]
    per_domain = onehot.T @ terms[:, _DOMAIN_TERMS]  # [D, 6]
    hist = _histogram2(w, s, layout)
    sums = torch.cat([glob, per_domain.reshape(-1), hist])
    maxes = torch.stack([w, -w, s, -s]).amax(dim=1)
    return PartialStats(layout, sums, maxes)


def histogram_quantiles(counts: Sequence[float], edges: Sequence[float], qs: Sequence[float],
                        vmin: float, vmax: float) -> list[float]:
    """Approximate quantiles from a histogram: linear inside the bin, clipped to the exact [vmin, vmax].
    One cumulative sum and a binary search per quantile (hundreds of bins on every logging step)."""
    cum = list(itertools.accumulate(counts))
    total = cum[-1] if cum else 0.0
    out: list[float] = []
    for q in qs:
        target = q * total
        i = bisect.bisect_left(cum, target)  # the first bin whose cumulative count reaches the target
        while i < len(counts) and counts[i] <= 0:  # q = 0 (target 0) starts at the first non-empty bin
            i += 1
        if i < len(counts):
            before = cum[i] - counts[i]
            value = edges[i] + (target - before) / counts[i] * (edges[i + 1] - edges[i])
        else:
            value = edges[-1]
        out.append(min(max(value, vmin), vmax))
    return out


@dataclass
class StepMetrics:
    """Finalised metrics of one step: scalars for `Monitor.log_step`, histograms as (counts, edges)
    over the populated span of the layout's fixed bins."""

    scalars: dict[str, float]
    histograms: dict[str, tuple[list[float], list[float]]]


def finalize(stats: PartialStats, domain_names: Sequence[str] | None = None) -> StepMetrics:
    """Turn (reduced) partial sums into named metrics. One host sync; call on logging steps only.

    Names: adapt/weight_{mean,std,min,max,p05,p25,p50,p75,p95}, adapt/ess (groups, (sum w)^2/sum w^2),
    adapt/ess_frac (ess / groups), adapt/effective_data_ratio (sum w*tokens / tokens: the share of
    token-level gradient mass kept), adapt/score_{mean,std,min,max}, adapt/groups, adapt/tokens,
    loss/mean (per token, unweighted), loss/weighted (sum w*l / sum w*tokens),
    domain/<name>/{mean_weight (token-weighted), token_share, weighted_share, loss}.
    Domains absent from the step get shares 0 and no mean_weight/loss (no fake points on curves).
    """
    lay = stats.layout
    names = list(domain_names) if domain_names is not None else [str(i) for i in range(lay.num_domains)]
    if len(names) != lay.num_domains:
        raise ValueError(f"{len(names)} domain names for {lay.num_domains} domains")
    v = stats.sums.double().cpu().tolist()
    mx = stats.maxes.double().cpu().tolist()
    n = v[_N]
    out: dict[str, float] = {"adapt/groups": n, "adapt/tokens": v[_T]}
    hists: dict[str, tuple[list[float], list[float]]] = {}
    if n > 0:
        w_mean, s_mean = v[_SW] / n, v[_SS] / n
        w_min, w_max, s_min, s_max = -mx[1], mx[0], -mx[3], mx[2]
        out.update({
            "adapt/weight_mean": w_mean,
            "adapt/weight_std": max(v[_SW2] / n - w_mean * w_mean, 0.0) ** 0.5,
            "adapt/weight_min": w_min,
            "adapt/weight_max": w_max,
            "adapt/ess": v[_SW] ** 2 / v[_SW2] if v[_SW2] > 0 else 0.0,
            "adapt/score_mean": s_mean,
            "adapt/score_std": max(v[_SS2] / n - s_mean * s_mean, 0.0) ** 0.5,
            "adapt/score_min": s_min,
            "adapt/score_max": s_max,
        })
        out["adapt/ess_frac"] = out["adapt/ess"] / n
        wo, so, b = lay.weight_hist_offset, lay.score_hist_offset, lay.num_bins
        wcounts, scounts = v[wo:wo + b], v[so:so + b]
        w_counts, w_edges = populated_span(wcounts, *lay.weight_range)
        for q, val in zip(QUANTILES, histogram_quantiles(w_counts, w_edges, QUANTILES, w_min, w_max)):
            out[f"adapt/weight_p{round(q * 100):02d}"] = val
        hists = {"hist/weights": (w_counts, w_edges), "hist/scores": populated_span(scounts, *lay.score_range)}
    if v[_T] > 0:
        out["adapt/effective_data_ratio"] = v[_WT] / v[_T]
        out["loss/mean"] = v[_L] / v[_T]
    if v[_WT] > 0:
        out["loss/weighted"] = v[_WL] / v[_WT]
    for d, name in enumerate(names):
        groups, sw, tok, wtok, loss, wloss = v[lay.domain_offset + _D_COLS * d: lay.domain_offset + _D_COLS * (d + 1)]
        out[f"domain/{name}/token_share"] = tok / v[_T] if v[_T] > 0 else 0.0
        out[f"domain/{name}/weighted_share"] = wtok / v[_WT] if v[_WT] > 0 else 0.0
        if tok > 0:
            out[f"domain/{name}/mean_weight"] = wtok / tok
            out[f"domain/{name}/loss"] = loss / tok
    return StepMetrics(out, hists)

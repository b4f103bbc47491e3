"""Stats vs independent numpy computations, micro-batch merging, and a real 2-process gloo reduction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adapt_pretrain.monitor.stats import (
    QUANTILES, StatsLayout, empty_stats, finalize, partial_stats,
)
from tests.distributed_helper import run_distributed

NAMES = ["a", "b", "c", "d", "e"]


def make_batch(seed: int, groups: int = 50, num_domains: int = 5, skip_domain: int | None = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    dom = torch.randint(0, num_domains, (groups,), generator=g)
    if skip_domain is not None:
        dom[dom == skip_domain] = 0
    tokens = torch.randint(1, 100, (groups,), generator=g)
    return {
        "weights": torch.rand(groups, generator=g) * 1.2 - 0.1,  # some outside the histogram range
        "scores": torch.randn(groups, generator=g) * 0.4,
        "group_tokens": tokens,
        "group_domain": dom,
        "group_loss": torch.rand(groups, generator=g) * 5 * tokens,
    }


def reference(batch: dict, names: list[str]) -> dict[str, float]:
    """Independent numpy formulas (docs/MONITORING.md definitions), no shared code with stats.py."""
    w, s = batch["weights"].double().numpy(), batch["scores"].double().numpy()
    t, l = batch["group_tokens"].double().numpy(), batch["group_loss"].double().numpy()
    d = batch["group_domain"].numpy()
    out = {
        "adapt/groups": len(w), "adapt/tokens": t.sum(),
        "adapt/weight_mean": w.mean(), "adapt/weight_std": w.std(), "adapt/weight_min": w.min(),
        "adapt/weight_max": w.max(), "adapt/ess": w.sum() ** 2 / (w ** 2).sum(),
        "adapt/ess_frac": w.sum() ** 2 / (w ** 2).sum() / len(w),
        "adapt/effective_data_ratio": (w * t).sum() / t.sum(),
        "adapt/score_mean": s.mean(), "adapt/score_std": s.std(), "adapt/score_min": s.min(), "adapt/score_max": s.max(),
        "loss/mean": l.sum() / t.sum(), "loss/weighted": (w * l).sum() / (w * t).sum(),
    }
    for i, name in enumerate(names):
        m = d == i
        out[f"domain/{name}/token_share"] = t[m].sum() / t.sum()
        out[f"domain/{name}/weighted_share"] = (w * t)[m].sum() / (w * t).sum()
        if m.any():
            out[f"domain/{name}/mean_weight"] = (w * t)[m].sum() / t[m].sum()
            out[f"domain/{name}/loss"] = l[m].sum() / t[m].sum()
    return out


def assert_matches(got: dict[str, float], want: dict[str, float]) -> None:
    for key, value in want.items():
        assert key in got, key
        assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-12), (key, got[key], value)


def concat(*batches: dict) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_metrics_match_numpy_reference():
    batch = make_batch(0)
    layout = StatsLayout(num_domains=5, num_bins=20)
    m = finalize(partial_stats(layout, **batch), NAMES)
    assert_matches(m.scalars, reference(batch, NAMES))
    # absent domain: shares are 0, no mean_weight/loss point
    assert m.scalars["domain/e/token_share"] == 0.0 and "domain/e/mean_weight" not in m.scalars
    # shares sum to one
    assert math.isclose(sum(m.scalars[f"domain/{n}/token_share"] for n in NAMES), 1.0)
    assert math.isclose(sum(m.scalars[f"domain/{n}/weighted_share"] for n in NAMES), 1.0)


def test_histograms_and_quantiles():
    batch = make_batch(1, groups=400)
    layout = StatsLayout(num_domains=5, num_bins=40, weight_range=(0.0, 1.0))
    m = finalize(partial_stats(layout, **batch), NAMES)
    counts, edges = m.histograms["hist/weights"]
    w = batch["weights"].double().numpy()
    grid = np.linspace(0.0, 1.0, 41)
    want, _ = np.histogram(np.clip(w, 0.0, 1.0 - 1e-12), bins=grid)
    # the populated span of the fixed grid: from the first to the last non-empty bin
    lo, hi = np.nonzero(want)[0][[0, -1]]
    np.testing.assert_allclose(edges, grid[lo:hi + 2], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(counts, want[lo:hi + 1])  # out-of-range weights land in the edge bins
    assert sum(counts) == len(w)
    width = 1.0 / 40
    for q in QUANTILES:
        # out-of-range weights are clamped into the edge bins, so compare with the clipped data
        exact = np.quantile(np.clip(w, 0.0, 1.0), q, method="inverted_cdf")
        got = m.scalars[f"adapt/weight_p{round(q * 100):02d}"]
        assert abs(got - exact) <= width + 1e-12, (q, got, exact)
    scounts, _ = m.histograms["hist/scores"]
    assert sum(scounts) == len(w)


def test_default_bins_resolve_a_narrow_weight_spread():
    """A real run's weights often spread over ~0.02 of [0, 1]: the default grid must still split them
    into many bins (with 64 bins they all fell into one or two and the heat map showed a flat block)."""
    g = torch.Generator().manual_seed(8)
    weights = 0.7 + 0.005 * torch.randn(256, generator=g, dtype=torch.float64)
    batch = dict(make_batch(8, groups=256), weights=weights)
    m = finalize(partial_stats(StatsLayout(num_domains=5), **batch), NAMES)
    counts, edges = m.histograms["hist/weights"]
    assert sum(1 for c in counts if c > 0) >= 8, counts
    assert edges[0] <= float(weights.min()) and edges[-1] >= float(weights.max())
    assert len(edges) <= 30  # only the populated span is handed out: the log stays small
    assert abs(m.scalars["adapt/weight_p50"] - float(weights.median())) < 1.0 / 512 + 1e-12


def test_microbatch_merge_equals_concatenation():
    layout = StatsLayout(num_domains=5)
    b1, b2, b3 = make_batch(2, groups=7), make_batch(3, groups=30), make_batch(4, groups=1)
    merged = empty_stats(layout)
    for b in (b1, b2, b3):
        merged = merged.merge(partial_stats(layout, **b))
    whole = partial_stats(layout, **concat(b1, b2, b3))
    torch.testing.assert_close(merged.sums, whole.sums, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(merged.maxes, whole.maxes)
    assert_matches(finalize(merged, NAMES).scalars, reference(concat(b1, b2, b3), NAMES))


def test_unknown_domain_counts_globally_only():
    batch = make_batch(7, groups=10, num_domains=2, skip_domain=None)
    batch["group_domain"][:3] = torch.tensor([-1, 2, 99])
    m = finalize(partial_stats(StatsLayout(num_domains=2), **batch), ["x", "y"])
    known = {k: v[3:] for k, v in batch.items()}
    assert m.scalars["adapt/groups"] == 10
    assert math.isclose(m.scalars["domain/x/token_share"] + m.scalars["domain/y/token_share"],
                        known["group_tokens"].sum().item() / batch["group_tokens"].sum().item())


def test_empty_batch_and_validation():
    layout = StatsLayout(num_domains=2)
    empty = {k: torch.zeros(0) for k in ("weights", "scores", "group_tokens", "group_loss")}
    m = finalize(partial_stats(layout, group_domain=torch.zeros(0, dtype=torch.long), **empty), ["x", "y"])
    assert m.scalars["adapt/groups"] == 0 and "adapt/weight_mean" not in m.scalars and not m.histograms
    with pytest.raises(ValueError):
        partial_stats(layout, torch.ones(3), torch.ones(2), torch.ones(3), torch.zeros(3, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError):
        StatsLayout(num_domains=2, weight_range=(1.0, 1.0))


def test_reduce_with_callables_is_identity_for_one_rank():
    layout = StatsLayout(num_domains=5)
    part = partial_stats(layout, **make_batch(5))
    red = part.reduce(lambda t: t, lambda t: t)
    assert torch.equal(red.sums, part.sums) and torch.equal(red.maxes, part.maxes)
    assert part.all_reduce() is part  # not initialised: no-op


def _dist_worker(rank: int, world_size: int) -> dict:
    # Uneven shards on purpose: ranks hold different numbers of groups; rank 1 misses a domain.
    batch = make_batch(10 + rank, groups=20 + 17 * rank, skip_domain=None if rank == 0 else 2)
    layout = StatsLayout(num_domains=5, num_bins=16)
    via_group = finalize(partial_stats(layout, **batch).all_reduce(), NAMES)
    return {"scalars": via_group.scalars, "hist": via_group.histograms["hist/weights"][0]}


def test_two_process_gloo_reduction_equals_single_process():
    results = run_distributed(_dist_worker, 2)
    whole = concat(make_batch(10, groups=20, skip_domain=None), make_batch(11, groups=37, skip_domain=2))
    layout = StatsLayout(num_domains=5, num_bins=16)
    single = finalize(partial_stats(layout, **whole), NAMES)
    for res in results:  # every rank gets the global metrics
        assert res["scalars"].keys() == single.scalars.keys()
        for key, value in single.scalars.items():
            assert math.isclose(res["scalars"][key], value, rel_tol=1e-12, abs_tol=1e-12), key
        assert res["hist"] == single.histograms["hist/weights"][0]
    assert_matches(single.scalars, reference(whole, NAMES))

"""group_pool and score_and_weight against independent fp64 references."""
from __future__ import annotations

import math

import pytest
import torch

from adapt_pretrain.kernels import group_pool, score_and_weight

from .helpers import BACKENDS, max_err, use_backend


def _pool_fp64(hidden, group_ids, positions, num_groups):
    out = torch.zeros(num_groups, hidden.shape[1], dtype=torch.float64)
    for t in range(hidden.shape[0]):
        g = int(group_ids[t])
        if g >= 0:
            out[g] += float(positions[t]) * hidden[t].double()
    return out


def _score_fp64(pooled, centroid, tau, w_min, w_max, mean, std):
    scores, weights = [], []
    for row in pooled.double():
        n = math.sqrt(float((row * row).sum()))
        s = float(row @ centroid.double()) / n if n > 0 else 0.0
        z = (s - mean) / std / max(tau, 1e-8)
        w = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
        scores.append(s)
        weights.append(min(max(w, w_min), w_max))
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_pool(backend, dtype, monkeypatch):
    device = use_backend(backend, monkeypatch)
    gen = torch.Generator().manual_seed(1)
    T, H, G = 45, 200, 8  # H not a multiple of the 128 block; group 5 left empty
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    group_ids = torch.randint(0, G, (T,), generator=gen)
    group_ids[group_ids == 5] = 6
    group_ids[::6] = -1
    positions = torch.randint(1, 500, (T,), generator=gen)
    positions[group_ids < 0] = 0
    want = _pool_fp64(hidden, group_ids, positions, G)
    got = group_pool(hidden.to(device), group_ids.to(device), positions.to(device), G)
    assert got.dtype == torch.float32 and got.shape == (G, H)
    assert torch.all(got[5] == 0)
    assert max_err(got, want) <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_and_weight(backend, monkeypatch):
    device = use_backend(backend, monkeypatch)
    gen = torch.Generator().manual_seed(2)
    G, H = 21, 50  # H spans two 32-wide blocks, the second partial
    pooled = torch.randn(G, H, generator=gen) * 40.0
    pooled[4] = 0.0  # an empty group: score 0, no NaN
    centroid = torch.randn(H, generator=gen) * 0.2
    for tau, w_min, w_max, mean, std in [(1.0, 0.0, 10.0, 0.0, 1.0), (0.07, 0.2, 0.8, 0.05, 0.3),
                                         (0.0, 0.1, 0.9, 0.0, 1.0)]:
        want_s, want_w = _score_fp64(pooled, centroid, tau, w_min, w_max, mean, std)
        s, w = score_and_weight(pooled.to(device), centroid.to(device), tau, w_min, w_max, mean, std)
        assert s.dtype == w.dtype == torch.float32
        assert torch.isfinite(s).all() and torch.isfinite(w).all()
        assert s[4].item() == 0.0
        assert max_err(s, want_s) <= 1e-5
        assert max_err(w, want_w) <= 1e-5
        bounds = torch.tensor([w_min, w_max], dtype=torch.float32)
        assert bounds[0] <= w.min().cpu() and w.max().cpu() <= bounds[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_then_score_matches_reference_path(backend, monkeypatch):
    """End to end on a packed batch: documents as contiguous runs with 1-based positions."""
    device = use_backend(backend, monkeypatch)
    gen = torch.Generator().manual_seed(5)
    lengths = [7, 1, 12, 3, 9]
    group_ids = torch.cat([torch.full((n,), g) for g, n in enumerate(lengths)] + [torch.full((4,), -1)])
    positions = torch.cat([torch.arange(1, n + 1) for n in lengths] + [torch.zeros(4, dtype=torch.long)])
    hidden = torch.randn(len(group_ids), 24, generator=gen)
    centroid = torch.nn.functional.normalize(torch.randn(24, generator=gen), dim=0) * 0.5
    pooled = group_pool(hidden.to(device), group_ids.to(device), positions.to(device), len(lengths))
    s, w = score_and_weight(pooled, centroid.to(device), 0.5, 0.0, 10.0)
    want_s, want_w = _score_fp64(_pool_fp64(hidden, group_ids, positions, len(lengths)), centroid,
                                 0.5, 0.0, 10.0, 0.0, 1.0)
    assert max_err(s, want_s) <= 1e-5 and max_err(w, want_w) <= 1e-5

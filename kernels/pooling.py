"""Public group pooling and score/weight epilogue: dispatch between Triton and torch."""
from __future__ import annotations

import torch

from . import reference
from ._dispatch import use_triton


def group_pool(hidden: torch.Tensor, group_ids: torch.Tensor, positions: torch.Tensor,
               num_groups: int) -> torch.Tensor:
    """Position-weighted sums sum_t position[t] * h_t per token group, fp32 [G, H].

    Group -1 (padding) is ignored. No autograd: ADAPT weights are detached by design.
    """
    if hidden.dim() != 2 or group_ids.shape != (hidden.shape[0],) or positions.shape != group_ids.shape:
        raise ValueError("expected hidden [T, H], group_ids [T], positions [T]")
    hidden = hidden.detach()
    if use_triton(hidden):
        from . import triton_pool

        if hidden.stride(-1) != 1:
            hidden = hidden.contiguous()
        return triton_pool.group_pool(hidden, group_ids.long().contiguous(),
                                      positions.contiguous(), int(num_groups))
    return reference.group_pool(hidden, group_ids.long(), positions, int(num_groups))


def score_and_weight(pooled: torch.Tensor, centroid: torch.Tensor, tau: float, w_min: float,
                     w_max: float, mean: float = 0.0,
                     std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, weights) per group: s = normalize(pooled) . centroid (0 for zero rows),
    w = clamp(sigmoid(((s - mean) / std) / max(tau, 1e-8)), w_min, w_max). Both fp32 [G]."""
    if pooled.dim() != 2 or centroid.shape != (pooled.shape[1],):
        raise ValueError("expected pooled [G, H] and centroid [H]")
    mean, std = float(mean), float(std)
    if use_triton(pooled):
        from . import triton_pool

        pooled = pooled.detach()
        if pooled.stride(-1) != 1:
            pooled = pooled.contiguous()
        return triton_pool.score_and_weight(pooled, centroid.detach().contiguous(), tau, w_min,
                                            w_max, mean, std)
    return reference.score_and_weight(pooled, centroid, tau, w_min, w_max, mean, std)

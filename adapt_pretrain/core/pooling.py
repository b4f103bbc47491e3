"""Position-weighted group pooling: phi_g = normalize(sum_{t in g} position[t] * h_t).

Later tokens have seen more of their document under the causal mask, so they count more. The
sums are returned un-normalised in fp32 so partial sums (sequence parallelism) can be all-reduced
before normalising.
"""
from __future__ import annotations

import torch

from adapt_pretrain.kernels import group_pool


def pool_groups(hidden: torch.Tensor, group_ids: torch.Tensor, positions: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[T, H] hidden states -> [G, H] fp32 position-weighted sums per group (group -1 ignored)."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if group_ids.shape != hidden.shape[:1] or positions.shape != hidden.shape[:1]:
        raise ValueError(
            f"group_ids {tuple(group_ids.shape)} and positions {tuple(positions.shape)} must be [T]={hidden.shape[0]}")
    return group_pool(hidden.detach(), group_ids, positions, num_groups)


def unit_rows(pooled: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalise rows; returns (unit vectors, mask of rows that had any mass)."""
    norms = pooled.norm(dim=-1)
    valid = norms > eps
    unit = pooled / norms.clamp_min(eps).unsqueeze(-1)
    return unit * valid.unsqueeze(-1), valid

"""Cross-rank reduction of per-row softmax statistics for vocab-parallel cross-entropy.

Each rank holds a vocabulary shard and computes, per row, a local max `m`, a local sum of
`exp(x - m)` `d`, and the target logit `xt` (0 when the target lies in another shard). The
global statistics follow from one MAX and one SUM all-reduce of [T]-sized vectors, so no
[T, V] data ever crosses ranks.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def allreduce_row_stats(m: torch.Tensor, d: torch.Tensor, xt: torch.Tensor,
                        group: Optional[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the global (max, sum-exp relative to that max, target logit) for every row."""
    if group is None:
        return m, d, xt
    gmax = m.clone()
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    # A rank whose shard contributes nothing to a row has m = -inf and d = 0: guard the 0 * inf.
    scaled = torch.where(d > 0, d * torch.exp(m - gmax), torch.zeros_like(d))
    both = torch.stack([scaled, xt])
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    return gmax, both[0].contiguous(), both[1].contiguous()

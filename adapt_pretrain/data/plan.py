"""Deterministic order of the stream: data-parallel coordinates, shard and document permutations.

Everything here is a pure function of (seed, epoch, rank, worker, manifest) so that any process can
recompute any other's schedule: that is what makes balanced ranks and exact resume possible
without communication.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from adapt_pretrain.config.base import ConfigError


def stream_index(rank: int, worker: int, num_workers: int) -> int:
    """Global stream id of (rank, worker); there are dp_size * num_workers streams."""
    return rank * num_workers + worker


def shard_permutation(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards)


def doc_permutation(seed: int, epoch: int, shard: int, num_docs: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, shard, 0xD0C]).permutation(num_docs)


def windows_for_tokens(stream_tokens: int, seq_len: int) -> int:
    """Number of [seq_len + 1] windows (overlapping by one) cut from a stream of that many tokens."""
    return 0 if stream_tokens < 2 else math.ceil((stream_tokens - 1) / seq_len)


def resolve_dp(rank: Optional[int], size: Optional[int]) -> tuple[int, int]:
    """Data-parallel (rank, size): given values win, else torch.distributed's, else (0, 1).

    With tensor/pipeline parallelism the global rank is not the data-parallel rank: pass both.
    """
    if rank is None or size is None:
        try:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                size = dist.get_world_size() if size is None else size
        except ImportError:  # pragma: no cover
            pass
    rank = 0 if rank is None else rank
    size = 1 if size is None else size
    if not 0 <= rank < size:
        raise ConfigError(f"data-parallel rank {rank} must be in [0, {size})")
    return rank, size

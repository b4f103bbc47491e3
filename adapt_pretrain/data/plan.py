"""Deterministic schedule of the stream: which shards a (rank, worker) reads, in which order.

Everything here is a pure function of (seed, epoch, rank, worker, manifest) so that any process can
recompute any other's schedule: that is what makes balanced ranks and exact resume possible
without communication.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def stream_index(rank: int, worker: int, num_workers: int) -> int:
    """Global stream id of (rank, worker); there are dp_size * num_workers streams."""
    return rank * num_workers + worker


def shard_permutation(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards)


def doc_permutation(seed: int, epoch: int, shard: int, num_docs: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, shard, 0xD0C]).permutation(num_docs)


def infinite_shard(seed: int, num_shards: int, stream: int, num_streams: int, j: int) -> tuple[int, int]:
    """(epoch, shard index) of the j-th shard of `stream` in infinite mode.

    Streams take turns over the concatenation of per-epoch permutations (position stream + j *
    num_streams), so every epoch's shards are read exactly once over all streams, for any number
    of shards (even fewer than streams), and all streams stay within one shard of each other.
    """
    q = stream + j * num_streams
    epoch, idx = divmod(q, num_shards)
    return epoch, int(shard_permutation(seed, epoch, num_shards)[idx])


def finite_shards(seed: int, epoch: int, num_shards: int, stream: int, num_streams: int) -> list[int]:
    return [int(x) for x in shard_permutation(seed, epoch, num_shards)[stream::num_streams]]


def windows_for_tokens(stream_tokens: int, seq_len: int) -> int:
    """Number of [seq_len + 1] windows (overlapping by one) cut from a stream of that many tokens."""
    return 0 if stream_tokens < 2 else math.ceil((stream_tokens - 1) / seq_len)


def finite_batches_per_worker(seed: int, epoch: int, shard_tokens: Sequence[int], shard_docs: Sequence[int],
                              num_streams: int, seq_len: int, micro_batch: int, balance: str) -> tuple[int, list[int]]:
    """(M, expected per stream): every worker of every rank yields exactly M micro-batches in a finite epoch.

    Expected counts come from the manifest (tokens + one EOS per document); `pad` takes the max
    (short streams add all-padding micro-batches), `drop` the min (long streams stop early).
    """
    expected = []
    for k in range(num_streams):
        ids = finite_shards(seed, epoch, len(shard_tokens), k, num_streams)
        t = sum(shard_tokens[i] + shard_docs[i] for i in ids)
        expected.append(math.ceil(windows_for_tokens(t, seq_len) / micro_batch))
    m = max(expected) if balance == "pad" else min(expected)
    return m, expected

"""An independent count of a finite epoch's micro-batches per (rank, worker) stream, for the stream tests.

Streams take shards round-robin from each epoch's permutation (`plan.shard_permutation`); the
expected micro-batches follow from the manifest's token counts (tokens + one EOS per document).
"""
from __future__ import annotations

import math
from typing import Sequence

from adapt_pretrain.data.plan import shard_permutation, windows_for_tokens


def finite_shards(seed: int, epoch: int, num_shards: int, stream: int, num_streams: int) -> list[int]:
    return [int(x) for x in shard_permutation(seed, epoch, num_shards)[stream::num_streams]]


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

"""Anchor documents as micro-batches, sharded over data-parallel ranks (docs/METHOD.md).

Rank r takes anchors r, r + dp, r + 2*dp, ...; every anchor is one sequence and one group,
truncated to seq_len. All ranks get the same number of micro-batches (short ranks pad with
all-padding sequences, group_id -1) so a collective inside the encoding forward cannot hang; the
trainer all-reduces the pooled partial sums.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

from adapt_pretrain.data.config import DataError, check_data_dir
from adapt_pretrain.data.manifest import Manifest
from adapt_pretrain.data.plan import resolve_dp
from adapt_pretrain.data.packing import StreamDoc, anchor_collate
from adapt_pretrain.data.shardio import read_shard
from adapt_pretrain.data.skips import SkipCounter

log = logging.getLogger("adapt_pretrain.data")


def load_anchor_docs(data_dir: str, strict: bool = True) -> list[StreamDoc]:
    """All anchor documents, in manifest order (strict by default: anchors are few and must be whole)."""
    check_data_dir(data_dir)
    man = Manifest.load(data_dir)
    info = man.anchors()
    if not info:
        raise DataError(f"{data_dir}: the manifest has no anchor set (prepare ran with num_anchors=0?)")
    docs = read_shard(os.path.join(data_dir, info["name"]), info["name"], SkipCounter(strict=strict),
                      man.token_dtype, man.vocab_size, man.domain_index(), info["sha256"])
    return [StreamDoc(d.tokens, d.domain, d.doc_id, d.bm25, ("anchor", i)) for i, d in enumerate(docs)]


def anchor_batches(data_dir: str, seq_len: int, micro_batch_size: int, dp_rank: Optional[int] = None,
                   dp_size: Optional[int] = None, num_anchors: Optional[int] = None,
                   strict: bool = True) -> list[dict[str, Any]]:
    """This rank's anchors as micro-batches in the TEAM_CONTRACTS format (each anchor one group).

    dp_rank / dp_size default to torch.distributed's (or 0 / 1); num_anchors keeps the first n.
    """
    dp_rank, dp_size = resolve_dp(dp_rank, dp_size)
    check_data_dir(data_dir)
    man = Manifest.load(data_dir)
    docs = load_anchor_docs(data_dir, strict)
    if num_anchors is not None and num_anchors > len(docs) and dp_rank == 0:
        log.warning("[adapt-pretrain] warning: %d anchors asked for (adapt.num_anchors) but %s holds only %d; using "
                    "%d. Prepare more (prepare.num_anchors / --num-anchors) or set adapt.num_anchors=%d.",
                    num_anchors, os.path.join(data_dir, "anchors.tar"), len(docs), len(docs), len(docs))
    if num_anchors is not None:
        docs = docs[:num_anchors]
    mine = docs[dp_rank::dp_size]
    per_rank = math.ceil(math.ceil(len(docs) / dp_size) / micro_batch_size)
    return [anchor_collate(mine[i * micro_batch_size:(i + 1) * micro_batch_size], micro_batch_size, seq_len,
                           man.eos_id) for i in range(per_rank)]

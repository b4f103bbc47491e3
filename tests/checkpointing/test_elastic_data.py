"""Elastic data resume: a stream saved under one data-parallel size / worker count continues under
another with every document token of the epoch read exactly once (docs/DATA.md "Elastic resume").

Checked two ways: (1) the redistribution alone, at the level of shard positions, documents and
token offsets, by a simulation that shares no code with the loader's packing; (2) end to end with
the real loader on a prepared corpus, where the documents are reassembled from the micro-batches'
groups and compared with the shards read straight from disk (the data tests' exactly-once check)
and with an uninterrupted run's multiset of documents.
"""
from __future__ import annotations

import collections
import json
import math
import random

import numpy as np
import pytest

from adapt_pretrain.data import DataError, DataStream, Manifest
from adapt_pretrain.data.elastic import Segment, StreamSchedule, redistribute
from tests.data.test_stream import MBS, SEQ, assemble, check_exactly_once, source_docs, stream, take

DOCS, TOKENS = 3, 4  # simulated shard: documents x tokens per document


def _read_from(item, stop=None):
    """Token units (position, doc, offset) an item yields from its start to `stop` (exclusive)."""
    q, d0, o0, _ = item
    out = []
    for d in range(d0, DOCS):
        for o in range(o0 if d == d0 else 0, TOKENS):
            if stop is not None and (d, o) >= stop:
                return out
            out.append((q, d, o))
    return out


def _consume(schedule: StreamSchedule, rng: random.Random, spread: int):
    """Random progress of every stream: units read so far and the cursors they leave."""
    units, cursors = [], []
    for k in range(schedule.segment.streams):
        length = len(schedule.pending(k)) + (schedule.regular_count(k) if schedule.finite else spread)
        j = rng.randrange(0, length + 2)
        if j == 0 and rng.random() < 0.3:
            cursors.append(None)
            continue
        if j >= length and schedule.finite:  # a finite stream that read everything
            units += [u for i in range(length) for u in _read_from(schedule.entry(k, i))]
            cursors.append({"end": True})
            continue
        j = min(j, length - 1)
        for i in range(j):
            units += _read_from(schedule.entry(k, i))
        item = schedule.entry(k, j)
        start = (item[1], item[2])
        later = [(d, o) for d in range(DOCS) for o in range(TOKENS) if (d, o) >= start]
        stop = rng.choice(later)
        units += _read_from(item, stop)
        cursors.append({"j": j, "d": stop[0], "o": stop[1]})
    return units, cursors


def _read_all(schedule: StreamSchedule, horizon: int):
    """Every unit the streams of `schedule` read at positions below `horizon` (all of a finite epoch)."""
    units = []
    for k in range(schedule.segment.streams):
        j = 0
        while True:
            item = schedule.entry(k, j)
            if item is None or (not schedule.finite and item[0] >= horizon and j >= len(schedule.pending(k))):
                break
            units += _read_from(item)
            j += 1
    return units


@pytest.mark.parametrize("finite", [True, False])
def test_redistribution_reads_every_token_once(finite):
    """N streams read a random amount, are redistributed over M, then over L: each token unit of
    the epoch (finite) / below a horizon (infinite) is read exactly once over all three phases."""
    rng = random.Random(7)
    for trial in range(300):
        shards = rng.randint(1, 13)
        sizes_of_shards = [rng.randint(1, 9) for _ in range(shards)]  # only balances; any sizes work
        sizes = [rng.randint(1, 6) for _ in range(3)]
        schedule = StreamSchedule(seed=3, finite=finite, epoch=0, num_shards=shards, segment=Segment(0, sizes[0]))
        units: list = []
        for n_next in sizes[1:]:
            read, cursors = _consume(schedule, rng, spread=3)
            units += read
            segment = redistribute(schedule, cursors, n_next, sizes_of_shards)
            schedule = StreamSchedule(3, finite, 0, shards, segment)
        horizon = schedule.segment.base + 2 * shards
        units += _read_all(schedule, horizon)
        limit = shards if finite else horizon
        counts = collections.Counter(u for u in units if u[0] < limit)
        want = {(q, d, o) for q in range(limit) for d in range(DOCS) for o in range(TOKENS)}
        assert set(counts) == want, f"trial {trial}: lost {sorted(want - set(counts))[:5]}"
        assert max(counts.values()) == 1, f"trial {trial}: repeated {[u for u, c in counts.items() if c > 1][:5]}"


def _doc_multiset(batches: list[dict]) -> collections.Counter:
    """doc_id -> loss-carrying label count over the micro-batches."""
    out: collections.Counter = collections.Counter()
    for b in batches:
        for g in range(int(b["num_groups"])):
            sel = b["group_id"] == g
            out[int(b["group_doc_id"][g])] += int(b["loss_mask"][sel].sum())
    return out


def _states(streams: list[DataStream]) -> list[dict]:
    return [json.loads(json.dumps(s.state_dict())) for s in streams]  # through JSON, as a checkpoint holds them


@pytest.mark.parametrize("before, after", [((2, 2), (1, 2)), ((1, 2), (2, 2)), ((2, 2), (2, 1)), ((2, 1), (1, 2))])
def test_finite_epoch_resumed_with_another_layout_reads_every_document_once(prepared, before, after):
    """(dp, workers) before -> after, stopped at an odd micro-batch: the rest of the epoch completes
    every document exactly once, and the documents' label counts equal an uninterrupted run's."""
    (dp0, w0), (dp1, w1) = before, after
    reference = [take(stream(prepared, mode="finite", dp_size=dp0, dp_rank=r, num_workers=w0))
                 for r in range(dp0)]
    first = [stream(prepared, mode="finite", dp_size=dp0, dp_rank=r, num_workers=w0) for r in range(dp0)]
    stop = 7
    head = [take(s, stop) for s in first]
    states = _states(first)
    resumed = [stream(prepared, mode="finite", dp_size=dp1, dp_rank=r, num_workers=w1) for r in range(dp1)]
    for s in resumed:
        s.load_state_dict(states)
    rest = [take(s) for s in resumed]
    assert len({len(r) for r in rest}) == 1, "ranks must stay equal"
    check_exactly_once(prepared, head + rest, dp0 * w0 + dp1 * w1)
    assert _doc_multiset(sum(head + rest, [])) == _doc_multiset(sum(reference, []))
    # the stated bound on all-padding micro-batches after the resume (pad balance): per new stream,
    # the micro-batches of the largest shard + 2
    largest = max(sh["tokens"] + sh["docs"] for sh in Manifest.load(prepared).shards("train"))
    pad = sum(int(b["num_groups"] == 0) for b in sum(rest, []))
    assert pad <= dp1 * w1 * (math.ceil(math.ceil(largest / SEQ) / MBS) + 2), pad
    # the stream goes on with the next epoch under the new layout
    assert all(s.stats()["epoch"] == 1 for s in resumed)
    assert sum(s.stats()["micro_batches"] for s in resumed) == sum(len(b) for b in head + rest)


def test_infinite_stream_resumed_with_another_layout_continues_the_cut_documents(prepared):
    """Infinite mode, 2 ranks x 2 workers -> 1 rank: the documents cut at the checkpoint continue at
    the exact token, and no other document read before is read again (all within epoch 0 here)."""
    first = [stream(prepared, dp_rank=r) for r in range(2)]
    head = [take(s, 5) for s in first]
    states = _states(first)
    one = stream(prepared, dp_size=1, dp_rank=0)
    one.load_state_dict(states)
    partly_read = [i for items in one.segment.items for i in items if i[3]]
    assert len(partly_read) == 4  # every old stream (2 ranks x 2 workers) was inside a shard
    rest = take(one, 12)
    before, after = _doc_multiset(sum(head, [])), _doc_multiset(rest)
    both = [d for d in after if d in before]
    assert 1 <= len(both) <= 4, both  # only documents cut at the checkpoint appear on both sides
    # ... and they continue at the exact token: the inputs before and after are a prefix of doc + EOS
    src = source_docs(prepared)
    eos = Manifest.load(prepared).eos_id
    pieces: dict = {}
    assemble(sum(head, []) + rest, pieces, {})
    for doc in both:
        got = np.concatenate(pieces[doc])
        want = np.append(src[doc][0], eos)
        np.testing.assert_array_equal(got, want[: len(got)])


def test_elastic_resume_still_refuses_other_data_or_seed(prepared):
    first = [stream(prepared, dp_rank=r) for r in range(2)]
    for s in first:
        take(s, 3)
    states = _states(first)
    with pytest.raises(DataError, match="seed"):
        stream(prepared, dp_size=1, dp_rank=0, seed=4).load_state_dict(states)
    with pytest.raises(DataError, match="manifest"):
        stream(prepared, dp_size=1, dp_rank=0).load_state_dict([dict(s, manifest="0" * 16) for s in states])
    with pytest.raises(DataError, match="ranks 0..n-1"):
        stream(prepared, dp_size=1, dp_rank=0).load_state_dict(states[1:])
    with pytest.raises(DataError, match="dp_size.*pass every data-parallel rank's state"):
        stream(prepared, dp_size=1, dp_rank=0).load_state_dict(states[0])

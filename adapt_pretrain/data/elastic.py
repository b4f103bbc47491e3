"""Shard schedules that survive a change of the number of streams (data-parallel size x workers).

A stream's schedule is a list of *items*, each a shard position with a starting document and
token offset. Position q names a shard: in infinite mode the q-th entry of the concatenated
per-epoch shard permutations (epoch, index = divmod(q, num_shards)), in finite mode the q-th entry
of this epoch's permutation. A `Segment` says how the `streams` streams share the positions:
stream k first reads its own list `items[k]`, then the regular positions base + k,
base + k + streams, ... (finite: while < num_shards). A fresh run is `Segment(base=0, streams=N)`
(no items): stream k reads k, k + N, ... as before.

`redistribute` turns where every old stream stands (its cursor: item j, document d, offset o of
the next window) into a segment for a different number of streams: the partly read shards continue
at their cursors, unread positions below a new frontier become whole items (finite mode: every
unread position of the epoch), and everything at or above the frontier is read regularly. Items are
dealt largest first onto the least-loaded stream (by the manifest's shard sizes) so that the
streams stay balanced, and each stream reads its items in position order. Every position (and
inside a partly read shard every token from its cursor on) is read exactly once over the old
streams' past and the new streams' future.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from adapt_pretrain.data import plan

Item = tuple[int, int, int, bool]  # (position, first document, token offset, already counted)


@dataclass
class Segment:
    base: int
    streams: int
    items: list[list[Item]] = field(default_factory=list)  # per stream; empty list = no items anywhere

    def as_dict(self) -> dict[str, Any]:
        return {"base": self.base, "streams": self.streams, "items": [[list(i) for i in s] for s in self.items]}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "Segment":
        items = [[(int(q), int(d), int(o), bool(c)) for q, d, o, c in s] for s in state["items"]]
        if items and len(items) != int(state["streams"]):
            raise ValueError(f"segment has item lists for {len(items)} streams, expected {state['streams']}")
        return cls(int(state["base"]), int(state["streams"]), items)


@dataclass
class StreamSchedule:
    """The shard schedule of every stream for one epoch (finite) or for the whole run (infinite)."""

    seed: int
    finite: bool
    epoch: int
    num_shards: int
    segment: Segment

    def pending(self, stream: int) -> list[Item]:
        return self.segment.items[stream] if self.segment.items else []

    def entry(self, stream: int, j: int) -> Optional[Item]:
        """The j-th item of `stream` (None: a finite stream's schedule has ended)."""
        pending = self.pending(stream)
        if j < len(pending):
            return pending[j]
        q = self.segment.base + stream + (j - len(pending)) * self.segment.streams
        if self.finite and q >= self.num_shards:
            return None
        return (q, 0, 0, False)

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, shard index) of a position."""
        if self.finite:
            return self.epoch, int(plan.shard_permutation(self.seed, self.epoch, self.num_shards)[position])
        epoch, index = divmod(position, self.num_shards)
        return epoch, int(plan.shard_permutation(self.seed, epoch, self.num_shards)[index])

    def regular_count(self, stream: int) -> int:
        """Regular positions of a finite stream (below num_shards)."""
        first = self.segment.base + stream
        return max(0, -(-(self.num_shards - first) // self.segment.streams))

    def finite_items(self, stream: int) -> list[Item]:
        return [self.entry(stream, j) for j in range(len(self.pending(stream)) + self.regular_count(stream))]


def finite_target(schedule: StreamSchedule, shard_tokens: Sequence[int], shard_docs: Sequence[int], seq_len: int,
                  micro_batch: int, balance: str) -> int:
    """Micro-batches every worker yields in this finite epoch (segment): `pad` the largest stream's
    count, `drop` the smallest. A partly read item counts as its whole shard, so after a
    redistribution the count is an upper bound of what is left (pad: a few extra padding batches)."""
    expected = []
    for k in range(schedule.segment.streams):
        tokens = 0
        for q, _, _, _ in schedule.finite_items(k):
            _, shard = schedule.locate(q)
            tokens += shard_tokens[shard] + shard_docs[shard]
        expected.append(-(-plan.windows_for_tokens(tokens, seq_len) // micro_batch))
    return max(expected) if balance == "pad" else min(expected)


def redistribute(schedule: StreamSchedule, cursors: Sequence[Optional[dict]], new_streams: int,
                 shard_sizes: Sequence[int]) -> Segment:
    """The segment under which `new_streams` streams read what the old streams have not read.

    cursors[k]: old stream k's cursor (None: nothing read yet; {"end": True}: a finite stream that
    finished; else {"j", "d", "o"}: the next window starts at item j, document d, token offset o).
    shard_sizes: tokens (+ one EOS per document) of every shard, to balance the streams.
    """
    seg = schedule.segment
    if len(cursors) != seg.streams:
        raise ValueError(f"{len(cursors)} cursors for a segment of {seg.streams} streams")
    remaining: list[Item] = []
    first_unread: list[int] = []  # per old stream: index of its first regular position not yet started
    for k, cursor in enumerate(cursors):
        pending = schedule.pending(k)
        if cursor is None:
            remaining += pending
            first_unread.append(0)
        elif cursor.get("end"):
            first_unread.append(schedule.regular_count(k))
        else:
            j = int(cursor["j"])
            position = schedule.entry(k, j)
            if position is None:
                raise ValueError(f"stream {k}: cursor {cursor} is past the end of its schedule")
            remaining.append((position[0], int(cursor["d"]), int(cursor["o"]), True))
            remaining += pending[j + 1:]
            first_unread.append(max(0, j - len(pending) + 1))
    n = seg.streams
    frontier = max([seg.base] + [seg.base + k + (i - 1) * n + 1 for k, i in enumerate(first_unread)])
    if schedule.finite:
        frontier = max(frontier, schedule.num_shards)  # the whole rest of the epoch becomes items
    for k, i in enumerate(first_unread):
        q = seg.base + k + i * n
        while q < frontier and not (schedule.finite and q >= schedule.num_shards):
            remaining.append((q, 0, 0, False))
            q += n
    return Segment(frontier, new_streams, _deal(remaining, new_streams, lambda q: shard_sizes[schedule.locate(q)[1]]))


def _deal(items: list[Item], streams: int, size) -> list[list[Item]]:
    """Largest item first onto the least-loaded stream (ties: lower position, lower stream); each
    stream's items in position order. Deterministic: every rank computes the same lists."""
    lists: list[list[Item]] = [[] for _ in range(streams)]
    load = [0] * streams
    for item in sorted(items, key=lambda it: (-size(it[0]), it)):
        k = min(range(streams), key=lambda s: (load[s], s))
        lists[k].append(item)
        load[k] += size(item[0])
    return [sorted(s) for s in lists]

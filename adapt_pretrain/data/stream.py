"""Streaming loader: WebDataset shards -> packed micro-batches, split over DP ranks and loader workers.

`DataStream(cfg)` is what a trainer iterates. Each (rank, worker) pair reads its own deterministic
shard schedule (plan.py), packs documents (packing.py) and tags every micro-batch with a resume
cursor (shard position, document position, token offset) and its skip counts; the main process
strips those tags, keeps the cursor of the last consumed micro-batch of every worker, and that is
the whole resume state. Micro-batch i of a rank always comes from worker i % num_workers.
Workers die with their rank (workers.py), also when the rank is killed.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from typing import Any, Iterator, Optional

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from adapt_pretrain.data import plan
from adapt_pretrain.data.config import DataConfig, DataError, check_data_dir
from adapt_pretrain.data.elastic import Segment, StreamSchedule, finite_target, redistribute
from adapt_pretrain.data.manifest import Manifest
from adapt_pretrain.data.packing import StreamDoc, as_torch, collate, pack_windows
from adapt_pretrain.data.shardio import read_shard
from adapt_pretrain.data.skips import KINDS, SkipCounter, add_counts
from adapt_pretrain.data.workers import die_with_parent_init

log = logging.getLogger("adapt_pretrain.data")
STATE_VERSION = 2  # 2: + "segment" (elastic resume); 1 (no segment) is still read


class _WorkerStream(IterableDataset):
    """The per-process part: picklable description of the stream + where each worker resumes."""

    def __init__(self, cfg: DataConfig, man: Manifest, rank: int, schedule: StreamSchedule,
                 cursors: list[Optional[dict]], produced: list[int], rotation: int, target: Optional[int]) -> None:
        super().__init__()
        self.cfg, self.rank, self.schedule = cfg, rank, schedule
        self.W = max(cfg.num_workers, 1)
        self.shards = man.shards(cfg.split)
        self.data_dir = man.data_dir
        self.dtype, self.vocab, self.eos = man.token_dtype, man.vocab_size, man.eos_id
        self.domain_index = man.domain_index()
        self.cursors, self.produced, self.rotation = cursors, produced, rotation
        self.target = target  # micro-batches per worker in this finite epoch (None: infinite)

    # -- documents --------------------------------------------------------------------------------
    def _shard_docs(self, shard: int, epoch: int, skips: SkipCounter) -> list:
        sh = self.shards[shard]
        docs = read_shard(os.path.join(self.data_dir, sh["name"]), sh["name"], skips, self.dtype, self.vocab,
                          self.domain_index, sh["sha256"] if self.cfg.verify_checksums else None)
        if self.cfg.shuffle_within_shard and docs:
            docs = [docs[i] for i in plan.doc_permutation(self.cfg.seed, epoch, shard, len(docs))]
        return docs

    def _docs(self, stream: int, cursor: Optional[dict], skips: SkipCounter) -> Iterator[StreamDoc]:
        """The documents of `stream` from `cursor` on; each tagged with its (item, document) location."""
        cfg, S = self.cfg, len(self.shards)
        j = cursor["j"] if cursor else 0
        empty_run = 0
        while True:
            item = self.schedule.entry(stream, j)
            if item is None:
                return
            position, d0, o0, counted = item
            epoch, shard = self.schedule.locate(position)
            resumed = cursor is not None and j == cursor["j"]
            if resumed:
                d0, o0 = cursor["d"], cursor["o"]
            # a resumed (or redistributed, partly read) shard was read and its skips counted before
            counter = SkipCounter(strict=cfg.strict) if (resumed or counted) else skips
            docs = self._shard_docs(shard, epoch, counter)
            for d in range(d0, len(docs)):
                doc = docs[d]
                yield StreamDoc(doc.tokens, doc.domain, doc.doc_id, doc.bm25, (j, d), o0 if d == d0 else 0)
            empty_run = 0 if docs else empty_run + 1
            if not self.schedule.finite and empty_run > S:
                raise DataError(f"stream {stream}: no readable documents in {empty_run} consecutive shards "
                                f"of {self.data_dir}; skipped so far: {skips.as_dict()}")
            j += 1

    # -- micro-batches ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        w = (wid + self.rotation) % self.W  # logical worker: batch i comes from logical worker i % W
        stream = plan.stream_index(self.rank, w, self.W)
        cursor = self.cursors[w]
        produced = self.produced[w]
        skips = SkipCounter(strict=self.cfg.strict)
        cfg = self.cfg
        b = cfg.micro_batch_size
        ended = cursor is not None and cursor.get("end", False)
        buf: list = []
        last_cursor: Optional[dict] = cursor

        def emit(windows: list, cur: Optional[dict]) -> dict[str, Any]:
            batch = collate(windows, b, cfg.seq_len, self.eos)
            batch["_cursor"] = cur
            batch["_skips"] = skips.as_dict()
            batch["_worker"] = w
            return batch

        if not ended:
            for win in pack_windows(self._docs(stream, cursor, skips), cfg.seq_len, self.eos):
                buf.append(win)
                if len(buf) == b:
                    if self.target is not None and produced >= self.target:
                        break  # `drop` balance: this stream is longer than the common count
                    last_cursor = self._cursor(buf[-1])
                    yield emit(buf, last_cursor)
                    produced += 1
                    buf = []
        if self.target is None:
            return
        if buf and produced < self.target:
            yield emit(buf, {"end": True})
            produced += 1
        while produced < self.target:  # `pad` balance: all-padding micro-batches
            yield emit([], {"end": True})
            produced += 1

    @staticmethod
    def _cursor(win: Any) -> dict:
        if win.next_loc is None:
            return {"end": True}
        (j, d), o = win.next_loc
        return {"j": int(j), "d": int(d), "o": int(o)}


def _identity(x: Any) -> Any:
    """DataLoader collate_fn: keep the worker's numpy arrays as they are (see packing.collate)."""
    return x


class DataStream:
    """Iterable of micro-batches (TEAM_CONTRACTS format) with exact resume and skip statistics.

    Usage: `ds = DataStream(cfg, dp_rank, dp_size); for batch in ds: ...; state = ds.state_dict()`;
    later `ds = DataStream(cfg, dp_rank, dp_size); ds.load_state_dict(state)` continues with the very next
    micro-batch.
    In finite mode one `iter()` is one epoch; the next `iter()` runs the next epoch.
    """

    def __init__(self, cfg: DataConfig, dp_rank: Optional[int] = None, dp_size: Optional[int] = None) -> None:
        """dp_rank / dp_size: this rank's data-parallel coordinates; None reads torch.distributed's (or 0 / 1).
        With tensor/pipeline parallelism the global rank is not the data-parallel rank: pass both."""
        check_data_dir(cfg.data_dir)
        self.cfg = cfg
        self.rank, self.dp_size = plan.resolve_dp(dp_rank, dp_size)
        self.manifest = Manifest.load(cfg.data_dir)
        if not self.manifest.shards(cfg.split):
            raise DataError(f"{cfg.data_dir}: split {cfg.split!r} has no shards")
        self.W = max(cfg.num_workers, 1)
        self.epoch = 0
        self.consumed = 0  # micro-batches consumed in this epoch (finite) / in total (infinite)
        self.cursors: list[Optional[dict]] = [None] * self.W
        self.segment = self._fresh_segment()
        self.worker_skips: list[dict[str, int]] = [{} for _ in range(self.W)]
        self.skip_base: list[dict[str, int]] = [{} for _ in range(self.W)]
        self.counters = {"micro_batches": 0, "padding_micro_batches": 0, "input_tokens": 0, "epochs_completed": 0}

    @property
    def domains(self) -> list[str]:
        return self.manifest.domains

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def eos_id(self) -> int:
        return self.manifest.eos_id

    def _fresh_segment(self) -> Segment:
        return Segment(base=0, streams=self.dp_size * self.W)

    def _schedule(self, segment: Optional[Segment] = None) -> StreamSchedule:
        return StreamSchedule(self.cfg.seed, self.cfg.mode == "finite", self.epoch,
                              len(self.manifest.shards(self.cfg.split)), segment or self.segment)

    def _target(self, segment: Optional[Segment] = None) -> Optional[int]:
        """Micro-batches per worker in this finite epoch (from the current segment on); None if infinite."""
        if self.cfg.mode != "finite":
            return None
        sh = self.manifest.shards(self.cfg.split)
        return finite_target(self._schedule(segment), [s["tokens"] for s in sh], [s["docs"] for s in sh],
                             self.cfg.seq_len, self.cfg.micro_batch_size, self.cfg.finite_balance)

    def batches_per_epoch(self) -> Optional[int]:
        """Micro-batches every rank yields per finite epoch (None in infinite mode); after an elastic
        resume, those of the rest of the epoch."""
        target = self._target()
        return None if target is None else target * self.W

    def _produced(self) -> list[int]:
        i = self.consumed
        return [(i - w + self.W - 1) // self.W if i > w else 0 for w in range(self.W)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        if cfg.mode == "finite" and self.consumed >= (self.batches_per_epoch() or 0):
            self._finish_epoch()  # the previous epoch was consumed to its last batch without exhausting iter()
        # workers restart their skip counters at zero: fold what they reported so far into the base
        for w in range(self.W):
            self.skip_base[w] = add_counts(self.skip_base[w], self.worker_skips[w])
        self.worker_skips = [{} for _ in range(self.W)]
        ds = _WorkerStream(cfg, self.manifest, self.rank, self._schedule(), list(self.cursors),
                           self._produced(), self.consumed % self.W, self._target())
        method = cfg.worker_start_method
        if method is None and cfg.num_workers and "fork" in mp.get_all_start_methods():
            method = "fork"
        loader = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers,
                            multiprocessing_context=method if cfg.num_workers else None,
                            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
                            persistent_workers=False, collate_fn=_identity,
                            worker_init_fn=die_with_parent_init() if cfg.num_workers else None)
        for batch in loader:
            w = batch.pop("_worker")
            if w != self.consumed % self.W:  # would break resume: fail loudly rather than drift
                raise DataError(f"loader order broken: got worker {w}, expected {self.consumed % self.W}")
            self.cursors[w] = batch.pop("_cursor")
            self.worker_skips[w] = batch.pop("_skips")
            self.consumed += 1
            batch = as_torch(batch)
            self.counters["micro_batches"] += 1
            if batch["num_groups"] == 0:
                self.counters["padding_micro_batches"] += 1
            self.counters["input_tokens"] += int((batch["group_id"] >= 0).sum())
            yield batch
        if cfg.mode == "finite":
            self._finish_epoch()

    def _finish_epoch(self) -> None:
        for w in range(self.W):
            self.skip_base[w] = add_counts(self.skip_base[w], self.worker_skips[w])
        self.worker_skips = [{} for _ in range(self.W)]
        self.cursors = [None] * self.W
        self.segment = self._fresh_segment()
        self.consumed = 0
        self.epoch += 1
        self.counters["epochs_completed"] += 1

    def stats(self) -> dict[str, int]:
        """Skip counts by kind (see skips.KINDS) plus loader counters; cumulative, survive resume."""
        total: dict[str, int] = {k: 0 for k in KINDS}
        for w in range(self.W):
            total = add_counts(total, add_counts(self.skip_base[w], self.worker_skips[w]))
        total["skipped_total"] = sum(total[k] for k in KINDS)
        total.update(self.counters)
        total["epoch"] = self.epoch
        return total

    # -- resume ----------------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        c = self.cfg
        return {"manifest": self.manifest.identity(), "split": c.split, "seed": c.seed, "dp_size": self.dp_size,
                "dp_rank": self.rank, "num_workers": c.num_workers, "mode": c.mode, "seq_len": c.seq_len,
                "micro_batch_size": c.micro_batch_size, "finite_balance": c.finite_balance,
                "shuffle_within_shard": c.shuffle_within_shard}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self._settings(), "epoch": self.epoch, "consumed": self.consumed,
                "cursors": [None if c is None else dict(c) for c in self.cursors],
                "segment": self.segment.as_dict(),
                "skips": [add_counts(self.skip_base[w], self.worker_skips[w]) for w in range(self.W)],
                "counters": dict(self.counters)}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue where a saved stream stopped.

        `state`: this rank's `state_dict()` (same data-parallel size and worker count: exact
        continuation), or the list of every data-parallel rank's states (any size and worker count
        now: the streams are redistributed, see docs/DATA.md "Elastic resume").
        """
        if isinstance(state, dict):
            self._load_own(state)
            return
        states = [self._checked(s, exact=False) for s in state]
        saved_dp = {int(s["dp_size"]) for s in states}
        if [int(s["dp_rank"]) for s in states] != list(range(len(states))) or saved_dp != {len(states)}:
            raise DataError(f"elastic data resume needs the states of data-parallel ranks 0..n-1 in order; got ranks "
                            f"{[s['dp_rank'] for s in states]} of dp sizes {sorted(saved_dp)}")
        workers = {int(s["num_workers"]) for s in states}
        if len(states) == self.dp_size and workers == {self.cfg.num_workers}:
            self._load_own(states[self.rank])
            return
        self._load_redistributed(states)

    def _checked(self, state: dict[str, Any], exact: bool) -> dict[str, Any]:
        """Version and settings check; `exact` also requires the same dp size, rank and worker count."""
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise DataError(f"data state version {version!r} is not supported (expected {STATE_VERSION})")
        layout_keys = ("dp_size", "dp_rank", "num_workers")
        now = {k: v for k, v in self._settings().items() if exact or k not in layout_keys}
        diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in now.items() if state.get(k) != v]
        if diffs:
            hint = ("; pass every data-parallel rank's state (a list) to redistribute the stream over another dp size "
                    "or num_workers" if all(d.split(":")[0] in layout_keys for d in diffs) else "")
            raise DataError("cannot resume the data stream; the checkpoint was written with different settings: "
                            + "; ".join(diffs) + ". Use the same data dir, seed, seq_len, micro-batch size, mode and "
                            "shuffle setting, or start the data stream fresh" + hint + ".")
        state = dict(state)
        if version == 1:  # before elastic resume: the plain schedule of dp_size * num_workers streams
            state["segment"] = {"base": 0, "streams": int(state["dp_size"]) * max(int(state["num_workers"]), 1),
                                "items": []}
        return state

    def _load_own(self, state: dict[str, Any]) -> None:
        state = self._checked(state, exact=True)
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self.cursors = [None if c is None else dict(c) for c in state["cursors"]]
        self.segment = Segment.from_dict(state["segment"])
        self.skip_base = [dict(s) for s in state["skips"]]
        self.worker_skips = [{} for _ in range(self.W)]
        self.counters = dict(state["counters"])

    def _load_redistributed(self, states: list[dict[str, Any]]) -> None:
        """Deal what the saved streams had not read over this run's streams (every rank computes the
        same segment from the same states). Counters and skip counts move to rank 0, so their sums
        over ranks continue; every rank keeps the number of epochs completed."""
        first = states[0]
        for key in ("epoch", "consumed", "segment", "num_workers"):
            if any(s[key] != first[key] for s in states):
                raise DataError(f"the saved data-parallel ranks disagree on {key!r}: the checkpoint is inconsistent")
        old_w = max(int(first["num_workers"]), 1)
        self.epoch = int(first["epoch"])
        old = self._schedule(Segment.from_dict(first["segment"]))
        cursors = [s["cursors"][w] for s in states for w in range(old_w)]  # by old stream = rank * W + w
        target = self._target(old.segment)
        if target is not None and int(first["consumed"]) >= target * old_w:
            self.segment = self._fresh_segment()  # that finite epoch was consumed to its end
            self.epoch += 1
        else:
            sizes = [sh["tokens"] + sh["docs"] for sh in self.manifest.shards(self.cfg.split)]
            self.segment = redistribute(old, cursors, self.dp_size * self.W, sizes)
        self.consumed = 0
        self.cursors = [None] * self.W
        self.worker_skips = [{} for _ in range(self.W)]
        self.skip_base = [{} for _ in range(self.W)]
        counters = {k: 0 for k in first["counters"]}
        if self.rank == 0:
            for s in states:
                for skips in s["skips"]:
                    self.skip_base[0] = add_counts(self.skip_base[0], skips)
                counters = {k: counters[k] + int(s["counters"].get(k, 0)) for k in counters}
        counters["epochs_completed"] = int(first["counters"].get("epochs_completed", 0))
        if self.epoch > int(first["epoch"]):
            counters["epochs_completed"] += 1
        self.counters = counters

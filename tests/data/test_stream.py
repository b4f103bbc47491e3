"""Streaming loader: exactly-once coverage over 2 ranks x 2 workers, balance, exact resume, refusals."""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch

from adapt_pretrain.data import DataConfig, DataError, DataStream, Manifest, anchor_batches, domain_names
from tests.data.schedule_oracle import finite_batches_per_worker
from adapt_pretrain.data.shardio import iter_raw_samples
from adapt_pretrain.data.skips import SkipCounter
from tests.distributed_helper import run_distributed

SEQ, MBS = 64, 4


def source_docs(data_dir: str, split: str = "train") -> dict[int, tuple[np.ndarray, str]]:
    """doc_id -> (tokens, domain), read straight from the tar files (not through the loader)."""
    out = {}
    for sh in Manifest.load(data_dir).shards(split):
        with open(os.path.join(data_dir, sh["name"]), "rb") as f:
            for s in iter_raw_samples(f.read(), sh["name"], SkipCounter(True)):
                rec = json.loads(s["json"])
                out[rec["doc_id"]] = (np.frombuffer(s["tokens"], dtype="<u2").astype(np.int64), rec["domain"])
    return out


def take(ds: DataStream, n: int | None = None) -> list[dict]:
    gen = iter(ds)
    out = list(gen if n is None else itertools.islice(gen, n))
    gen.close()  # shuts the DataLoader workers down now
    return out


def cfg(data_dir, **kw):
    base = dict(data_dir=data_dir, seq_len=SEQ, micro_batch_size=MBS, num_workers=2, seed=3)
    base.update(kw)
    return DataConfig(**base)


def stream(data_dir, dp_rank: int = 0, dp_size: int = 2, **kw) -> DataStream:
    """A DataStream of `cfg(data_dir, **kw)` at the given data-parallel coordinates."""
    return DataStream(cfg(data_dir, **kw), dp_rank=dp_rank, dp_size=dp_size)


def assemble(batches: list[dict], pieces: dict[int, list[np.ndarray]], domains: dict[int, int]) -> None:
    """Append every group's input tokens to its document, in consumption order."""
    for b in batches:
        b = {k: np.asarray(v) for k, v in b.items()}
        gid = b["group_id"]
        for g in range(int(b["num_groups"])):
            sel = gid == g
            pos = b["position"][sel]
            assert pos.tolist() == list(range(1, int(sel.sum()) + 1))
            doc = int(b["group_doc_id"][g])
            pieces.setdefault(doc, []).append(b["tokens"][sel])
            domains[doc] = int(b["group_domain"][g])


def check_exactly_once(data_dir: str, per_rank: list[list[dict]], num_streams: int) -> None:
    src = source_docs(data_dir)
    names = domain_names(data_dir)
    pieces: dict[int, list[np.ndarray]] = {}
    doms: dict[int, int] = {}
    for batches in per_rank:
        assemble(batches, pieces, doms)
    assert set(pieces) == set(src)  # every document, none invented
    short = 0
    eos = Manifest.load(data_dir).eos_id
    for doc, parts in pieces.items():
        got = np.concatenate(parts)
        want = np.concatenate([src[doc][0], [eos]])
        assert names[doms[doc]] == src[doc][1]
        if len(got) == len(want) - 1:  # the last document of a stream: its final EOS is never an input
            short += 1
            want = want[:-1]
        np.testing.assert_array_equal(got, want)  # each token exactly once, in order
    assert short <= num_streams


def test_finite_epoch_every_document_once_over_2_ranks_x_2_workers(prepared):
    per_rank = [take(stream(prepared, dp_rank=r, mode="finite")) for r in range(2)]
    n = stream(prepared, mode="finite").batches_per_epoch()
    assert len(per_rank[0]) == len(per_rank[1]) == n
    check_exactly_once(prepared, per_rank, 4)


def test_finite_drop_balance_gives_min_count_and_counts_nothing_as_skip(prepared):
    m, expected = finite_batches_per_worker(3, 0, [s["tokens"] for s in Manifest.load(prepared).shards("train")],
                                                 [s["docs"] for s in Manifest.load(prepared).shards("train")],
                                                 4, SEQ, MBS, "drop")
    assert m == min(expected) and len(set(expected)) > 1  # shards are uneven here
    lens = [len(take(stream(prepared, dp_rank=r, mode="finite", finite_balance="drop"))) for r in range(2)]
    assert lens == [2 * m, 2 * m]


def test_infinite_mode_runs_past_an_epoch(prepared):
    per_epoch = stream(prepared, num_workers=1, dp_size=1, mode="finite").batches_per_epoch()
    ds = stream(prepared, num_workers=1, dp_size=1)
    batches = take(ds, per_epoch + 20)
    assert len(batches) == per_epoch + 20 and all(b["num_groups"] > 0 for b in batches)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]) for k in a)


@pytest.mark.parametrize("mode", ["infinite", "finite"])
def test_resume_equals_uninterrupted_2_ranks_x_2_workers(prepared, mode):
    for rank in range(2):
        ref_ds = stream(prepared, dp_rank=rank, mode=mode)
        if mode == "finite":
            n0 = ref_ds.batches_per_epoch()
            ref = take(ref_ds) + take(ref_ds, 6)  # epoch 0, then the start of epoch 1
            stops = [7, n0 - 3]
        else:
            ref = take(ref_ds, 40)
            stops = [7, 22]
        for stop in stops:
            ds = stream(prepared, dp_rank=rank, mode=mode)
            first = take(ds, stop)
            state = json.loads(json.dumps(ds.state_dict()))  # must survive a JSON checkpoint
            resumed = stream(prepared, dp_rank=rank, mode=mode)
            resumed.load_state_dict(state)
            rest = take(resumed)[: len(ref) - stop] if mode == "finite" else take(resumed, len(ref) - stop)
            if mode == "finite":  # finish epoch 0, then one more iter() for epoch 1
                rest += take(resumed, len(ref) - stop - len(rest))
            got = first + rest
            assert len(got) == len(ref)
            for i, (a, b) in enumerate(zip(got, ref)):
                assert same(a, b), f"rank {rank} stop {stop}: micro-batch {i} differs"


def test_resume_refuses_different_settings(prepared):
    ds = stream(prepared)
    take(ds, 3)
    state = ds.state_dict()
    for change, word in [(dict(dp_size=4), "dp_size"), (dict(num_workers=1), "num_workers"), (dict(seed=4), "seed")]:
        with pytest.raises(DataError, match=word):
            stream(prepared, **change).load_state_dict(state)
    bad = dict(state, manifest="0" * 16)
    with pytest.raises(DataError, match="manifest"):
        stream(prepared).load_state_dict(bad)


def _distributed_epoch(rank: int, world: int, data_dir: str) -> dict:
    import torch.distributed as dist
    ds = DataStream(DataConfig(data_dir=data_dir, seq_len=SEQ, micro_batch_size=MBS, num_workers=2, seed=3,
                               mode="finite"))
    batches = []
    for b in ds:
        t = torch.ones(1)
        dist.all_reduce(t)  # a collective every micro-batch: uneven ranks would hang here
        # plain numpy back to the parent: tensors would be shared through files that die with this process
        batches.append({k: v.numpy().copy() if isinstance(v, torch.Tensor) else v for k, v in b.items()})
    return {"n": len(batches), "batches": batches, "rank": ds.rank}


def test_real_processes_two_ranks_same_count_and_exactly_once(prepared):
    res = run_distributed(_distributed_epoch, 2, prepared, timeout=120)
    assert [r["rank"] for r in res] == [0, 1]
    assert res[0]["n"] == res[1]["n"]
    check_exactly_once(prepared, [r["batches"] for r in res], 4)


def test_anchor_batches_sharded_over_ranks(prepared):
    man = Manifest.load(prepared)
    ids = man.anchors()["doc_ids"]
    per_rank = [anchor_batches(prepared, 32, 3, dp_rank=r, dp_size=3) for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1  # same number of micro-batches on every rank
    src = source_docs(prepared, "val")
    for r, batches in enumerate(per_rank):
        got = [int(x) for b in batches for x in b["group_doc_id"]]
        assert got == ids[r::3]
        for b in batches:
            for g in range(b["num_groups"]):
                sel = b["group_id"] == g
                toks = src[int(b["group_doc_id"][g])][0]
                want = np.concatenate([toks, [man.eos_id]])[:32]
                np.testing.assert_array_equal(b["tokens"][sel].numpy(), want[: int(sel.sum())])
                assert int(sel.sum()) == min(32, len(toks))  # truncated to seq_len; one group per anchor


def test_finite_epoch_consumed_exactly_then_next_iter_is_next_epoch(prepared):
    c = cfg(prepared, mode="finite", num_workers=1)
    ref = DataStream(c, dp_rank=0, dp_size=1)
    n = ref.batches_per_epoch()
    ep0, ep1 = take(ref), take(ref, 3)
    ds = DataStream(c, dp_rank=0, dp_size=1)
    first = take(ds, n)  # stop right after the last batch without exhausting the iterator
    again = take(ds, 3)
    assert all(same(a, b) for a, b in zip(first + again, ep0 + ep1)) and len(again) == 3
    assert ds.stats()["epoch"] == 1

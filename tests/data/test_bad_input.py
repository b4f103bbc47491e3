"""Bad shards and samples: skipped and counted by default (nothing silently), raised in strict mode."""
from __future__ import annotations

import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from adapt_pretrain.data import DataConfig, DataError, DataStream, Manifest
from adapt_pretrain.data.shardio import sha256_file
from adapt_pretrain.data.skips import KINDS
from webdataset.writer import TarWriter

from .test_stream import take


@pytest.fixture()
def damaged(prepared, tmp_path):
    """A private copy of the prepared data to break."""
    d = tmp_path / "data"
    shutil.copytree(prepared, d)
    return str(d)


def _cfg(d, **kw):
    base = dict(data_dir=d, seq_len=64, micro_batch_size=4, num_workers=2, mode="finite")
    base.update(kw)
    return DataConfig(**base)


def _delivered_docs(batches) -> set[int]:
    return {int(x) for b in batches for x in b["group_doc_id"]}


def _nonzero(stats):
    return {k: stats[k] for k in KINDS if stats[k]}


def _shard_doc_ids(path):
    with tarfile.open(path) as tf:
        return [json.loads(tf.extractfile(m).read())["doc_id"] for m in tf.getmembers() if m.name.endswith(".json")]


def test_truncated_tar_keeps_samples_before_the_cut(damaged):
    sh = Manifest.load(damaged).shards("train")[3]
    path = os.path.join(damaged, sh["name"])
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    ids = _shard_doc_ids(path)
    k = len(ids) // 2
    cut_member = [m for m in members if m.name.endswith(".tokens")][k]
    cut = cut_member.offset_data + 3  # inside doc k's token data
    # the docs whose members all end before the cut survive
    complete = {}
    for m in members:
        key = m.name.split(".")[0]
        complete.setdefault(key, True)
        complete[key] &= m.offset_data + m.size <= cut
    keep = {int(key) for key, ok in complete.items() if ok}
    with open(path, "r+b") as f:
        f.truncate(cut)
    batches = take(DataStream(_cfg(damaged)))
    ds_docs = _delivered_docs(batches)
    all_docs = set(source_docs_except(damaged, sh["name"])) | keep
    assert ds_docs == all_docs
    assert set(ids) - keep  # something was really lost, and it was counted:
    ds = DataStream(_cfg(damaged))
    take(ds)
    assert _nonzero(ds.stats()) == {"shard_corrupt": 1, "checksum_mismatch": 1}
    with pytest.raises(DataError, match=rf"{sh['name']} key="):
        take(DataStream(_cfg(damaged, strict=True)))


def source_docs_except(data_dir, broken_name):
    out = []
    for sh in Manifest.load(data_dir).shards("train"):
        if sh["name"] != broken_name:
            out += _shard_doc_ids(os.path.join(data_dir, sh["name"]))
    return out


def test_garbage_and_missing_shards_are_counted(damaged):
    shards = Manifest.load(damaged).shards("train")
    with open(os.path.join(damaged, shards[0]["name"]), "wb") as f:
        f.write(np.random.default_rng(0).bytes(5000))
    os.remove(os.path.join(damaged, shards[1]["name"]))
    ds = DataStream(_cfg(damaged))
    batches = take(ds)
    assert _nonzero(ds.stats()) == {"shard_corrupt": 1, "checksum_mismatch": 1, "shard_missing": 1}
    assert _delivered_docs(batches) == set(source_docs_except_many(damaged, {shards[0]["name"], shards[1]["name"]}))
    assert len(batches) == DataStream(_cfg(damaged)).batches_per_epoch()  # still balanced (padded)
    assert shards[0]["docs"] + shards[1]["docs"] > 0  # documents were really lost, and counted above
    with pytest.raises(DataError, match=r"(shard_missing|shard_corrupt|checksum_mismatch): train/train-00000[01]\.tar"):
        take(DataStream(_cfg(damaged, strict=True, seed=0)))


def source_docs_except_many(data_dir, broken):
    out = []
    for sh in Manifest.load(data_dir).shards("train"):
        if sh["name"] not in broken:
            out += _shard_doc_ids(os.path.join(data_dir, sh["name"]))
    return out


def _rewrite_with_bad_samples(data_dir) -> tuple[str, set[int], set[int]]:
    """Rewrite one shard: 5 bad samples (4 malformed, 1 out-of-vocab) among good ones; fix its sha256."""
    man = Manifest.load(data_dir)
    sh = max(man.shards("train"), key=lambda s: s["docs"])
    path = os.path.join(data_dir, sh["name"])
    with tarfile.open(path) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    keys = sorted({n.split(".")[0] for n in files})
    assert len(keys) >= 7
    bad, good = set(), set()
    with open(path, "wb") as f:
        w = TarWriter(f, encoder=False)
        for i, key in enumerate(keys):
            toks, rec = files[f"{key}.tokens"], files[f"{key}.json"]
            doc = json.loads(rec)["doc_id"]
            sample = {"__key__": key, "tokens": toks, "json": rec}
            if i == 0:
                del sample["json"]                                        # missing field
            elif i == 1:
                sample["json"] = b"{not json"                             # malformed JSON
            elif i == 2:
                sample["tokens"] = toks[:-1]                              # wrong byte length
            elif i == 3:
                r = json.loads(rec); del r["doc_id"]; sample["json"] = json.dumps(r).encode()  # missing doc_id
            elif i == 4:
                arr = np.frombuffer(toks, dtype="<u2").copy(); arr[0] = man.vocab_size  # id outside vocab
                sample["tokens"] = arr.tobytes()
            (bad if i <= 4 else good).add(doc)
            w.write(sample)
        w.close()
    raw = json.loads(open(os.path.join(data_dir, "manifest.json")).read())
    for s in raw["splits"]["train"]["shards"]:
        if s["name"] == sh["name"]:
            s["sha256"] = sha256_file(path)
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump(raw, f)
    return sh["name"], bad, good


def test_malformed_samples_and_out_of_vocab_ids(damaged):
    every = set(source_docs_except(damaged, "-"))  # all docs, read before the damage
    name, bad, good = _rewrite_with_bad_samples(damaged)
    ds = DataStream(_cfg(damaged))
    delivered = _delivered_docs(take(ds))
    assert _nonzero(ds.stats()) == {"malformed_sample": 4, "token_out_of_vocab": 1}
    assert not (delivered & bad) and good <= delivered
    assert delivered | bad == every  # each document delivered or counted, none silently lost
    with pytest.raises(DataError, match=rf"malformed_sample: {name} key="):
        take(DataStream(_cfg(damaged, strict=True)))


def test_skip_counts_survive_resume_without_double_counting(damaged):
    _rewrite_with_bad_samples(damaged)
    n = DataStream(_cfg(damaged, seq_len=256)).batches_per_epoch() + 10  # past one epoch: the bad shard is read
    full = DataStream(_cfg(damaged, mode="infinite", seq_len=256))
    take(full, n)
    assert _nonzero(full.stats()) == {"malformed_sample": 4, "token_out_of_vocab": 1}
    for stop in (13, n - 12):
        ds = DataStream(_cfg(damaged, mode="infinite", seq_len=256))
        take(ds, stop)
        again = DataStream(_cfg(damaged, mode="infinite", seq_len=256))
        again.load_state_dict(ds.state_dict())
        take(again, n - stop)
        assert _nonzero(again.stats()) == _nonzero(full.stats())
        assert again.stats()["micro_batches"] == n

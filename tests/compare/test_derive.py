"""Derived data dirs (top-k subsets, static mixes) are valid prepared data the loader reads unchanged."""
import gzip
import json
import os

import pytest

from adapt_pretrain.data.config import DataConfig, PrepareConfig
from adapt_pretrain.data.manifest import Manifest, check_counts, iter_split_records
from adapt_pretrain.data.prepare import prepare
from adapt_pretrain.experiments.methods.derive import COPY_STRIDE, doc_table
from adapt_pretrain.experiments.methods.offline import bm25_scores, build_static_mix, build_topk


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    words = {"code": "def return import class self value", "prose": "the and of to in that it was",
             "junk": "<div> </div> <td> &nbsp; | --- |"}
    path = root / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i in range(60):
            for dom, w in words.items():
                text = " ".join(w.split()[(i + k) % len(w.split())] for k in range(5 + (i * 7) % 23))
                fh.write(json.dumps({"text": text, "domain": dom}) + "\n")
    out = str(root / "data")
    prepare(PrepareConfig(inputs=[str(path)], out_dir=out, vocab_size=300, val_fraction=0.1, anchor_domains=["code"],
                          num_anchors=4, shard_tokens=400, num_workers=1, bm25=True, progress=False))
    return out


def test_topk_bm25_subset_is_a_valid_data_dir(data_dir, tmp_path):
    ids, scores, toks = bm25_scores(data_dir)
    out = build_topk(data_dir, str(tmp_path / "topk"), ids, scores, toks, 0.3, 0, {"method": "topk-bm25"})
    assert check_counts(out) == []
    kept = doc_table(out)
    total = sum(toks)
    assert 0.3 * total <= sum(d.tokens for d in kept) < 0.3 * total + max(toks)
    # the kept documents are exactly the best-scoring ones
    best = sorted(zip(ids, scores), key=lambda t: (-t[1], t[0]))[:len(kept)]  # score desc, ties by id
    assert {d.doc_id for d in kept} == {i for i, _ in best}
    assert Manifest.load(out).raw["derived"]["fraction"] == 0.3
    assert sorted(os.listdir(os.path.join(out, "val"))) == sorted(os.listdir(os.path.join(data_dir, "val")))
    # cached: a second call with the same settings does not rewrite
    mtime = os.path.getmtime(os.path.join(out, "manifest.json"))
    build_topk(data_dir, out, ids, scores, toks, 0.3, 0, {"method": "topk-bm25"})
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == mtime


def test_static_mix_token_shares_and_unique_keys(data_dir, tmp_path):
    weights = {"code": 0.6, "prose": 0.3, "junk": 0.1}
    out = build_static_mix(data_dir, str(tmp_path / "mix"), weights, seed=0)
    man = Manifest.load(out)
    per = man.raw["splits"]["train"]["tokens_per_domain"]
    total = sum(per.values())
    src_total = Manifest.load(data_dir).raw["splits"]["train"]["tokens"]
    assert total >= src_total
    for d, w in weights.items():
        assert abs(per[d] / total - w) < 0.03
    recs = [r for r, _ in iter_split_records(out)]
    assert len({r["doc_id"] for r in recs}) == len(recs)  # copies got fresh ids
    assert all(r["doc_id"] % COPY_STRIDE == r["orig_doc_id"] for r in recs)
    assert check_counts(out) == []


def test_loader_reads_a_derived_dir(data_dir, tmp_path):
    from adapt_pretrain.data.stream import DataStream

    ids, scores, toks = bm25_scores(data_dir)
    out = build_topk(data_dir, str(tmp_path / "topk"), ids, scores, toks, 0.2, 0, {"method": "topk-bm25"})
    stream = DataStream(DataConfig(data_dir=out, seq_len=16, micro_batch_size=2, num_workers=0, mode="infinite"))
    it = iter(stream)
    batches = [next(it) for _ in range(30)]  # more tokens than the subset holds: it repeats
    assert all(b["tokens"].shape == (2, 16) for b in batches)


def test_held_out_sets_val_split_and_extra_jsonl(data_dir, tmp_path):
    from adapt_pretrain.evaluate import EvalSettings, held_out_sets

    extra = tmp_path / "more.jsonl"
    extra.write_text(json.dumps({"text": "def value", "domain": "code"}) + "\n"
                     + json.dumps({"text": "brand new words"}) + "\n")
    man = Manifest.load(data_dir)
    sets = held_out_sets(data_dir, [str(extra)], man.tokenizer_path, EvalSettings())
    val = Manifest.load(data_dir).raw["splits"]["val"]["docs_per_domain"]
    assert {d: len(sets[d].docs) for d in val} == val  # fewer than `docs` each: every validation document
    assert {d: sets[d].available for d in val} == val
    assert sets["code"].source == "val" and sets["more:code"].source.endswith("more.jsonl")  # no silent merge
    assert len(sets["more"].docs) == 1 and sets["more"].docs[0].size > 0
    few = held_out_sets(data_dir, [], man.tokenizer_path, EvalSettings(docs=2))
    assert all(len(h.docs) == 2 and h.available == val[d] for d, h in few.items())

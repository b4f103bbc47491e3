"""prepare: counts against an independent tokenisation, splits, anchors, BM25, inputs, bad lines."""
from __future__ import annotations

import gzip
import json
import math
import os

import numpy as np
import pytest
from tokenizers import Tokenizer

from adapt_pretrain.data import DataError, Manifest, PrepareConfig, check_counts, prepare, recount
from adapt_pretrain.data.prepare import main as prepare_main
from adapt_pretrain.data.shardio import iter_raw_samples
from adapt_pretrain.data.skips import SkipCounter

from .conftest import DOCS_PER_DOMAIN


def _input_docs(corpus_dir):
    docs = []
    for name in sorted(os.listdir(corpus_dir)):
        with open(os.path.join(corpus_dir, name), encoding="utf-8") as f:
            docs += [json.loads(line) for line in f]
    return docs


def test_manifest_counts_match_independent_tokenisation(prepared, small_corpus):
    man = Manifest.load(prepared)
    tok = Tokenizer.from_file(man.tokenizer_path)
    expected_docs: dict[str, int] = {}
    expected_tokens: dict[str, int] = {}
    for d in _input_docs(small_corpus):
        expected_docs[d["domain"]] = expected_docs.get(d["domain"], 0) + 1
        n = len(tok.encode(d["text"], add_special_tokens=False).ids)
        expected_tokens[d["domain"]] = expected_tokens.get(d["domain"], 0) + n
    splits = man.raw["splits"]
    for dom in expected_docs:
        assert splits["train"]["docs_per_domain"][dom] + splits["val"]["docs_per_domain"].get(dom, 0) == expected_docs[dom]
        assert (splits["train"]["tokens_per_domain"][dom] + splits["val"]["tokens_per_domain"].get(dom, 0)
                == expected_tokens[dom])
    assert expected_docs == DOCS_PER_DOMAIN
    assert check_counts(prepared) == []  # recount from the shards agrees with the manifest


def test_recount_detects_a_wrong_manifest(prepared, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    dom = sorted(raw["splits"]["train"]["tokens_per_domain"])[0]
    raw["splits"]["train"]["tokens_per_domain"][dom] += 1
    (copy / "manifest.json").write_text(json.dumps(raw))
    problems = check_counts(str(copy))
    assert len(problems) == 1 and "train.tokens_per_domain" in problems[0]
    assert recount(str(copy))["train"]["tokens_per_domain"][dom] == raw["splits"]["train"]["tokens_per_domain"][dom] - 1


def test_val_split_is_exact_fraction_per_domain(prepared):
    val = Manifest.load(prepared).raw["splits"]["val"]["docs_per_domain"]
    assert val == {d: math.floor(n * 0.1) for d, n in DOCS_PER_DOMAIN.items()}


def _records(path):
    with open(path, "rb") as f:
        return [(s["__key__"], json.loads(s["json"]), s["tokens"]) for s in iter_raw_samples(f.read(), path, SkipCounter(True))]


def test_anchors_are_validation_docs_round_robin_over_domains(prepared):
    man = Manifest.load(prepared)
    a = man.anchors()
    anchors = _records(os.path.join(prepared, a["name"]))
    assert len(anchors) == 10 == a["docs"]
    val_ids = {r["doc_id"] for sh in man.shards("val") for _, r, _ in _records(os.path.join(prepared, sh["name"]))}
    assert {r["doc_id"] for _, r, _ in anchors} <= val_ids
    doms = [r["domain"] for _, r, _ in anchors]
    assert doms[:5] == sorted(DOCS_PER_DOMAIN) and doms[5:] == sorted(DOCS_PER_DOMAIN)


def test_bm25_is_zscored_and_matches_naive_formula(prepared):
    man = Manifest.load(prepared)
    recs = []
    for split in ("train", "val"):
        for sh in man.shards(split):
            for _, r, tb in _records(os.path.join(prepared, sh["name"])):
                recs.append((r, np.frombuffer(tb, dtype="<u2").astype(np.int64)))
    z = np.array([r["bm25"] for r, _ in recs])
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1.0) < 1e-6
    anchors = [np.frombuffer(tb, dtype="<u2") for _, _, tb in _records(os.path.join(prepared, "anchors.tar"))]
    # naive Okapi BM25 (Lucene idf), averaged over anchors, each anchor's distinct terms as the query
    docs = [t for _, t in recs]
    N = len(docs)
    avgdl = sum(len(t) for t in docs) / N
    df = {}
    for t in docs:
        for term in set(t.tolist()):
            df[term] = df.get(term, 0) + 1

    def bm25(doc, query):
        tf = {}
        for x in doc.tolist():
            tf[x] = tf.get(x, 0) + 1
        s = 0.0
        for q in set(query.tolist()):
            f = tf.get(q, 0)
            idf = math.log((N - df.get(q, 0) + 0.5) / (df.get(q, 0) + 0.5) + 1)
            s += idf * f * 2.2 / (f + 1.2 * (0.25 + 0.75 * len(doc) / avgdl))
        return s

    raw = [np.mean([bm25(t, a) for a in anchors]) for t in docs[:20]]
    mean, std = man.raw["bm25"]["raw_mean"], man.raw["bm25"]["raw_std"]
    np.testing.assert_allclose([(x - mean) / std for x in raw], z[:20], rtol=1e-6, atol=1e-6)


def test_worker_count_does_not_change_output(small_corpus, prepared, tmp_path):
    out = tmp_path / "one"
    prepare(PrepareConfig(inputs=[small_corpus], out_dir=str(out), tokenizer=Manifest.load(prepared).tokenizer_path,
                          shard_tokens=6000, num_anchors=10, bm25=True, num_workers=1, progress=False, val_fraction=0.1))
    a, b = Manifest.load(prepared).raw, Manifest.load(str(out)).raw
    assert a["splits"] == b["splits"] and a["anchors"] == b["anchors"]


def test_slimpajama_shape_text_folder_and_bad_lines(tmp_path):
    sp = tmp_path / "slim.jsonl.gz"
    good = [{"text": f"slim document number {i} " * 5, "meta": {"redpajama_set_name": "RedPajamaWikipedia"}}
            for i in range(6)]
    with gzip.open(sp, "wb") as f:
        for r in good[:3]:
            f.write((json.dumps(r) + "\n").encode())
        f.write(b'{"text": "caf\xe9 latin-1 bytes"}\n')      # non-UTF-8
        f.write(b'{"text": "unterminated\n')                   # invalid JSON
        f.write(b'{"body": "no text field"}\n')                # missing text
        f.write(b'{"text": "   "}\n')                          # empty document
        f.write(b'[1, 2]\n')                                   # not an object
        for r in good[3:]:
            f.write((json.dumps(r) + "\n").encode())
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("first plain text note " * 20)
    (folder / "b.txt").write_text("second plain text note " * 20)
    (folder / "c.txt").write_bytes(b"\xff\xfe bad")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "no domain given " * 10}) + "\n")
    out = tmp_path / "out"
    prepare(PrepareConfig(inputs=[str(sp), str(folder), str(plain)], out_dir=str(out), vocab_size=300,
                          num_anchors=1, val_fraction=0.5, num_workers=1, progress=False))
    man = Manifest.load(str(out))
    assert man.domains == ["RedPajamaWikipedia", "notes", "plain"]
    total = {d: man.raw["splits"]["train"]["docs_per_domain"].get(d, 0) + man.raw["splits"]["val"]["docs_per_domain"].get(d, 0)
             for d in man.domains}
    assert total == {"RedPajamaWikipedia": 6, "notes": 2, "plain": 1}
    assert {k: v for k, v in man.raw["skipped"].items() if v} == {
        "non_utf8": 2, "invalid_json": 2, "missing_text": 1, "empty_document": 1}
    with pytest.raises(DataError, match=r"non_utf8: .*slim.jsonl.gz key=line 4"):
        prepare(PrepareConfig(inputs=[str(sp)], out_dir=str(tmp_path / "strict"), vocab_size=300, num_anchors=1,
                              num_workers=1, progress=False, strict=True))


def test_cli_refuses_non_empty_out_dir_and_verifies(prepared, small_corpus, tmp_path, capsys):
    assert prepare_main(["--input", small_corpus, "--out", prepared, "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    out = tmp_path / "cli"
    rc = prepare_main(["--input", small_corpus, "--out", str(out), "--vocab-size", "300", "--workers", "2",
                       "--no-progress", "--verify", "--val-fraction", "0.1", "--anchor-domains", "kjv_bible", "--num-anchors", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and "recount: OK" in text
    anchors = Manifest.load(str(out)).anchors()
    assert anchors["docs"] == 2 and anchors["target_domains"] == ["kjv_bible"]


def test_whole_demo_corpus_manifest_matches_recount(tmp_path):
    """The done-when check on the bundled corpus: every line becomes a document; recount agrees."""
    from adapt_pretrain.data import demo_corpus_paths

    out = tmp_path / "demo"
    prepare(PrepareConfig(inputs=demo_corpus_paths(), out_dir=str(out), vocab_size=512, num_workers=2,
                          progress=False, shard_tokens=1 << 17))
    raw = Manifest.load(str(out)).raw
    lines = {}
    for p in demo_corpus_paths():
        with gzip.open(p, "rt", encoding="utf-8") as f:
            for line in f:
                dom = json.loads(line)["domain"]
                lines[dom] = lines.get(dom, 0) + 1
    got = {d: raw["splits"]["train"]["docs_per_domain"].get(d, 0) + raw["splits"]["val"]["docs_per_domain"].get(d, 0)
           for d in lines}
    assert got == lines and sum(raw["skipped"].values()) == 0
    assert check_counts(str(out)) == []

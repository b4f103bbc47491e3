"""prepare on damaged and awkward input: damaged .gz files, exact duplicates, very long documents.

References share no code with what they check: zlib decodes the damaged gzip for the expected kept
lines, Python sets find the duplicates, HF `tokenizers` encodes whole texts for the piece check.
"""
from __future__ import annotations

import gzip
import importlib
import json
import os
import random
import tarfile
import zlib

import pytest

from adapt_pretrain.data import DataError, Manifest, PrepareConfig, prepare
from adapt_pretrain.data.prepare import main as prepare_main


def rows(domain: str, n: int) -> list[dict]:
    return [{"text": f"{domain} document {i}: " + " ".join(f"word{(i * 7 + k) % 31}" for k in range(40)),
             "domain": domain} for i in range(n)]


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")


def shard_token_bytes(out: str, split: str) -> list[bytes]:
    """The `.tokens` payload of every document of a split, in shard order."""
    found = []
    folder = os.path.join(out, split)
    for name in sorted(os.listdir(folder)):
        with tarfile.open(os.path.join(folder, name)) as tf:
            found += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".tokens")]
    return found


def _cfg(inputs, out, **kw) -> PrepareConfig:
    base = dict(inputs=inputs, out_dir=str(out), vocab_size=512, num_anchors=2, num_workers=1, progress=False,
                val_fraction=0.1)
    base.update(kw)
    return PrepareConfig(**base)


@pytest.fixture()
def damaged_inputs(tmp_path):
    """A good file beside a truncated, a non-gzip and a corrupt `.gz`; returns (paths, kept truncated lines)."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.jsonl").write_bytes(jsonl_bytes(rows("good", 30)))
    packed = gzip.compress(jsonl_bytes(rows("trunc", 60)), mtime=0)
    cut = packed[: int(len(packed) * 0.6)]
    (d / "trunc.jsonl.gz").write_bytes(cut)
    (d / "notgz.jsonl.gz").write_bytes(jsonl_bytes(rows("notgz", 5)))
    corrupt = bytearray(gzip.compress(jsonl_bytes(rows("corrupt", 20)), mtime=0))
    for i in range(40, 60):
        corrupt[i] ^= 0xFF
    (d / "corrupt.jsonl.gz").write_bytes(bytes(corrupt))
    prefix = zlib.decompressobj(wbits=31).decompress(cut)  # what can be recovered, decoded independently
    kept = prefix.count(b"\n")
    assert 0 < kept < 60
    return [str(d / n) for n in ("good.jsonl", "trunc.jsonl.gz", "notgz.jsonl.gz", "corrupt.jsonl.gz")], kept


def test_damaged_gz_is_counted_and_the_lines_before_are_kept(damaged_inputs, tmp_path):
    inputs, kept = damaged_inputs
    man = Manifest.load(os.path.dirname(prepare(_cfg(inputs, tmp_path / "out"))))
    assert man.raw["skipped"]["damaged_compressed"] == 3  # truncated, not gzip, corrupt: each counted once
    docs = {d: man.raw["splits"]["train"]["docs_per_domain"].get(d, 0) + man.raw["splits"]["val"]["docs_per_domain"]
            .get(d, 0) for d in ("good", "trunc", "notgz")}
    assert docs == {"good": 30, "trunc": kept, "notgz": 0}


def test_damaged_gz_in_strict_mode_is_a_named_error(damaged_inputs, tmp_path, capsys):
    inputs, _ = damaged_inputs
    with pytest.raises(DataError, match=r"damaged_compressed: .*trunc\.jsonl\.gz"):
        prepare(_cfg(inputs[:2], tmp_path / "out", strict=True))
    code = prepare_main(["--input", inputs[0], inputs[2], "--out", str(tmp_path / "cli"), "--strict", "--vocab-size",
                         "512", "--workers", "1", "--no-progress", "--num-anchors", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "damaged_compressed" in err and "notgz.jsonl.gz" in err and "Traceback" not in err


def duplicate_corpus(path) -> list[str]:
    """With val_fraction 0.5 every second document is validation: copies at odd positions of texts
    first seen at even ones would land in the other split if duplicates were not routed."""
    base = rows("dup", 12)
    order = [0, 0, 1, 2, 1, 3, 4, 5, 6, 4, 7, 2, 8, 9, 10, 11]
    records = [base[i] for i in order]
    path.write_bytes(jsonl_bytes(records))
    return [r["text"] for r in records]


@pytest.mark.parametrize("drop", [False, True])
def test_exact_duplicates_counted_and_never_in_both_splits(tmp_path, drop):
    texts = duplicate_corpus(tmp_path / "dup.jsonl")
    out = tmp_path / "out"
    man = Manifest.load(os.path.dirname(prepare(_cfg([str(tmp_path / "dup.jsonl")], out, val_fraction=0.5,
                                                     num_anchors=1, drop_duplicates=drop))))
    copies = len(texts) - len(set(texts))
    assert man.raw["duplicates"] == {"documents": copies, "dropped": copies if drop else 0}
    train, val = shard_token_bytes(str(out), "train"), shard_token_bytes(str(out), "val")
    assert not set(train) & set(val)  # identical text = identical token ids
    assert len(train) + len(val) == (len(set(texts)) if drop else len(texts))
    assert len(set(train)) + len(set(val)) == len(set(texts))


def mixed_texts(seed: int, count: int) -> list[str]:
    """Prose mixed with awkward whitespace, scripts and digits: the places where a cut could go wrong."""
    rng = random.Random(seed)
    words = ["alpha", "Beta", "gamma's", "δέλτα", "日本語", "٣٤", "x²", "--", "don't", "7", "naïve", "\u00a0", "\u2003"]
    spaces = [" ", "  ", "\n", "\n\n", "\t", " \n ", "\r\n", "\n\n\n   ", "\x1c", " \t\n"]
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(50, 400)):
            parts.append(rng.choice(words))
            parts.append(rng.choice(spaces) if rng.random() < 0.3 else " ")
        out.append("".join(parts))
    return out


def test_pieces_encode_to_the_same_ids_as_the_whole_text(prepared):
    from tokenizers import Tokenizer

    from adapt_pretrain.data.pieces import split_text

    tok = Tokenizer.from_file(os.path.join(prepared, "tokenizer.json"))
    cuts = 0
    for i, text in enumerate(mixed_texts(0, 100)):
        pieces, hard = split_text(text, 64 + i)
        assert "".join(pieces) == text and hard == 0 and max(map(len, pieces)) <= 64 + i
        cuts += len(pieces) - 1
        whole = tok.encode(text, add_special_tokens=False).ids
        assert [t for p in pieces for t in tok.encode(p, add_special_tokens=False).ids] == whole, i
    assert cuts > 800


def test_a_long_document_is_tokenised_in_bounded_pieces(prepared, small_corpus, tmp_path, monkeypatch):
    prep = importlib.import_module("adapt_pretrain.data.prepare")  # the package exports a function of that name

    long_text = "\n".join(mixed_texts(1, 120))
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": long_text, "domain": "long"}) + "\n")
    inputs = [str(tmp_path / "long.jsonl"), small_corpus]
    tokenizer = os.path.join(prepared, "tokenizer.json")
    calls: list[int] = []
    init = prep._init_worker

    class Recorder:
        """The real tokenizer, recording how many characters each encode call gets."""

        def __init__(self, tok):
            self.tok = tok

        def encode_batch(self, texts, **kw):
            calls.append(sum(map(len, texts)))
            return self.tok.encode_batch(texts, **kw)

    def recording_init(path):
        init(path)
        prep._TOK = Recorder(prep._TOK)

    monkeypatch.setattr(prep, "_init_worker", recording_init)
    limit = 4096
    prepare(_cfg(inputs, tmp_path / "pieces", tokenizer=tokenizer, max_piece_chars=limit))
    assert max(calls) <= limit and len(long_text) > 20 * limit
    whole = tmp_path / "whole"
    prepare(_cfg(inputs, whole, tokenizer=tokenizer, max_piece_chars=1 << 40))
    for split in ("train", "val"):
        assert shard_token_bytes(str(tmp_path / "pieces"), split) == shard_token_bytes(str(whole), split)
    info = Manifest.load(str(tmp_path / "pieces")).raw["long_documents"]
    assert info["documents"] >= 1 and info["pieces"] > 20 and info["hard_cuts"] == 0

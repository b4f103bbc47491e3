"""WebDataset shard format: write samples, read them back with every failure counted.

One sample per document: `KEY.tokens` (little-endian uint16/uint32 token ids, no EOS; the loader
appends it) and `KEY.json` ({doc_id, domain, source, n_tokens[, bm25]}). A shard is read into
memory whole (shards are a few MB): that gives the sha256 check for free, lets the loader
permute documents inside a shard, and makes a resume cursor a plain (shard, doc) index.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import numpy as np
from webdataset.tariterators import tar_file_iterator
from webdataset.writer import TarWriter

from adapt_pretrain.data.skips import SkipCounter


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def sample_key(doc_id: int) -> str:
    return f"{doc_id:010d}"


class ShardFile:
    """A tar shard being written; deterministic bytes (fixed mtime/owner) so checksums reproduce."""

    def __init__(self, path: str, dtype: str) -> None:
        self.path = path
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._f = open(path, "wb")
        self._w = TarWriter(self._f, encoder=False, mtime=0.0)
        self.docs = 0
        self.tokens = 0
        self.docs_per_domain: dict[str, int] = {}
        self.tokens_per_domain: dict[str, int] = {}

    def write(self, doc_id: int, tokens: np.ndarray, record: dict) -> None:
        arr = np.asarray(tokens).astype(self.dtype, copy=False)
        rec = dict(record, doc_id=int(doc_id), n_tokens=int(arr.size))
        self._w.write({"__key__": sample_key(doc_id), "tokens": arr.tobytes(),
                       "json": json.dumps(rec, ensure_ascii=False).encode("utf-8")})
        d = rec["domain"]
        self.docs += 1
        self.tokens += int(arr.size)
        self.docs_per_domain[d] = self.docs_per_domain.get(d, 0) + 1
        self.tokens_per_domain[d] = self.tokens_per_domain.get(d, 0) + int(arr.size)

    def close(self) -> None:
        self._w.close()
        if not self._f.closed:
            self._f.close()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def iter_raw_samples(data: bytes, name: str, skips: SkipCounter) -> Iterator[dict[str, bytes]]:
    """Group tar members into {ext: bytes, "__key__": key}; a damaged tar ends the shard, counted."""
    current: Optional[dict] = None
    last_key = "<start>"
    try:
        for member in tar_file_iterator(io.BytesIO(data)):
            fname = member["fname"]
            key, _, ext = fname.partition(".")
            last_key = key
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = member["data"]
    except Exception as exc:  # tarfile.ReadError, EOFError, ... from a truncated or garbled tar
        if current is not None and "tokens" in current and "json" in current:
            yield current  # fully read before the damage; decode_sample still validates it
        skips.bad("shard_corrupt", name, last_key, f"{type(exc).__name__}: {exc} (rest of shard skipped)")
        return
    if current is not None:
        yield current


@dataclass
class Doc:
    """A decoded, validated document as the loader uses it."""

    tokens: np.ndarray  # int64, without EOS
    domain: int
    doc_id: int
    bm25: float


def decode_sample(sample: Mapping[str, bytes], name: str, skips: SkipCounter, dtype: np.dtype,
                  vocab_size: int, domain_index: Mapping[str, int]) -> Optional[Doc]:
    """Validate one raw sample; None (after counting / raising) when it is unusable."""
    key = sample.get("__key__", "?")
    missing = [e for e in ("tokens", "json") if e not in sample]
    if missing:
        skips.bad("malformed_sample", name, key, f"missing field(s) {missing}")
        return None
    try:
        rec = json.loads(sample["json"].decode("utf-8"))
        if not isinstance(rec, dict):
            raise ValueError("record is not an object")
        doc_id, domain, n = rec["doc_id"], rec["domain"], rec["n_tokens"]
        if not isinstance(doc_id, int) or not isinstance(n, int) or not isinstance(domain, str):
            raise ValueError("doc_id/n_tokens must be integers and domain a string")
        bm25 = float(rec.get("bm25", 0.0))
    except (ValueError, KeyError, UnicodeDecodeError, TypeError) as exc:
        skips.bad("malformed_sample", name, key, f"bad json record: {exc}")
        return None
    if domain not in domain_index:
        skips.bad("malformed_sample", name, key, f"domain {domain!r} not in manifest")
        return None
    raw = sample["tokens"]
    if len(raw) % dtype.itemsize or len(raw) // dtype.itemsize != n or n == 0:
        skips.bad("malformed_sample", name, key, f"tokens hold {len(raw)} bytes, record says {n} x {dtype}")
        return None
    toks = np.frombuffer(raw, dtype=dtype).astype(np.int64)
    top = int(toks.max())
    if top >= vocab_size:
        skips.bad("token_out_of_vocab", name, key, f"token id {top} >= vocab size {vocab_size}")
        return None
    return Doc(toks, domain_index[domain], doc_id, bm25)


def read_shard(path: str, name: str, skips: SkipCounter, dtype: str, vocab_size: int,
               domain_index: Mapping[str, int], sha256: Optional[str] = None) -> list[Doc]:
    """Every usable document of one shard, in file order; every problem counted or raised."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        skips.bad("shard_missing", name, "-", f"{type(exc).__name__}: {exc}")
        return []
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        skips.bad("checksum_mismatch", name, "-", "sha256 differs from manifest (reading what is valid)")
    dt = np.dtype(dtype).newbyteorder("<")
    docs = []
    for sample in iter_raw_samples(data, name, skips):
        doc = decode_sample(sample, name, skips, dt, vocab_size, domain_index)
        if doc is not None:
            docs.append(doc)
    return docs


class SplitWriter:
    """Rolls shards of one split at `shard_tokens` tokens; names are `split/split-000000.tar`."""

    def __init__(self, out_dir: str, split: str, dtype: str, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        self.current: Optional[ShardFile] = None
        self.done: list[ShardFile] = []

    def write(self, doc_id: int, tokens: np.ndarray, record: dict) -> None:
        if self.current is None:
            name = f"{self.split}/{self.split}-{len(self.done):06d}.tar"
            self.current = ShardFile(os.path.join(self.out_dir, name), self.dtype)
            self.current.name = name  # type: ignore[attr-defined]
        self.current.write(doc_id, tokens, record)
        if self.current.tokens >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.done.append(self.current)
            self.current = None

"""Raw-document readers: JSONL / JSONL.gz (plain or SlimPajama shape) and plain-text folders.

Lines are read as bytes and decoded strictly, so a non-UTF-8 document is counted (or raised in
strict mode) instead of being replaced with U+FFFD behind our back; a damaged compressed file is
counted likewise, keeping the documents before the damage. Sources are interleaved
round-robin so every shard mixes domains even when each input file holds a single domain.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

from adapt_pretrain.data.skips import SkipCounter

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")


@dataclass
class RawDoc:
    text: str
    domain: str
    source: str


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suf in JSONL_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return os.path.splitext(name)[0]


def _domain_of(obj: dict, default: str) -> str:
    dom = obj.get("domain")
    if not isinstance(dom, str) or not dom:
        meta = obj.get("meta")
        if isinstance(meta, dict) and isinstance(meta.get("redpajama_set_name"), str):
            dom = meta["redpajama_set_name"]
    return dom if isinstance(dom, str) and dom else default


# What a damaged compressed file raises while it is read: a truncated stream (EOFError), a file that
# is not gzip at all or has garbage after a member (BadGzipFile, an OSError), corrupt deflate data
# (zlib.error).
DECOMPRESSION_ERRORS = (EOFError, OSError, zlib.error)


def read_jsonl(path: str, skips: SkipCounter) -> Iterator[RawDoc]:
    """Documents of one JSONL(.gz) file; a missing domain falls back to the file's stem.

    A damaged `.gz` (truncated, not gzip, corrupt) ends the file with one `damaged_compressed`
    skip (DataError in strict mode); the complete lines before the damage are kept.
    """
    default_domain = _stem(path)
    compressed = path.endswith(".gz")
    lineno = 0
    with (gzip.open if compressed else open)(path, "rb") as f:
        try:
            for lineno, raw in enumerate(f, 1):
                doc = _parse_line(raw, path, lineno, default_domain, skips)
                if doc is not None:
                    yield doc
        except DECOMPRESSION_ERRORS as exc:
            if not compressed:
                raise  # a plain file that cannot be read: an I/O problem, not damaged input
            skips.bad("damaged_compressed", path, f"after line {lineno}",
                      f"{type(exc).__name__}: {exc} (the {lineno} line(s) before the damage are kept; the rest "
                      "of the file is skipped)")


def _parse_line(raw: bytes, path: str, lineno: int, default_domain: str, skips: SkipCounter) -> Optional[RawDoc]:
    """One JSONL line -> RawDoc, or None after counting (or raising on) what is wrong with it."""
    key = f"line {lineno}"
    if not raw.strip():
        return None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        skips.bad("non_utf8", path, key, str(exc))
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        skips.bad("invalid_json", path, key, str(exc))
        return None
    if not isinstance(obj, dict):
        skips.bad("invalid_json", path, key, f"expected an object, got {type(obj).__name__}")
        return None
    text = obj.get("text")
    if not isinstance(text, str):
        skips.bad("missing_text", path, key, "no string field 'text'")
        return None
    if not text.strip():
        skips.bad("empty_document", path, key, "text is empty")
        return None
    source = obj.get("source")
    if not isinstance(source, str):
        source = f"{os.path.basename(path)}:{lineno}"
    return RawDoc(text, _domain_of(obj, default_domain), source)


def read_text_folder(path: str, skips: SkipCounter) -> Iterator[RawDoc]:
    """Every regular file under `path` (sorted, recursive) is one document of domain basename(path)."""
    domain = os.path.basename(os.path.normpath(path))
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            fp = os.path.join(root, name)
            with open(fp, "rb") as f:
                data = f.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                skips.bad("non_utf8", fp, name, str(exc))
                continue
            if not text.strip():
                skips.bad("empty_document", fp, name, "file is empty")
                continue
            yield RawDoc(text, domain, os.path.relpath(fp, os.path.dirname(os.path.normpath(path))))


def expand_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """[(kind, path)] with kind `jsonl` or `text`; a folder holding JSONL files expands to them."""
    out: list[tuple[str, str]] = []
    for p in inputs:
        if os.path.isdir(p):
            names = sorted(os.listdir(p))
            jsonl = [os.path.join(p, n) for n in names if n.endswith(JSONL_SUFFIXES)]
            if jsonl:
                out += [("jsonl", j) for j in jsonl]
            else:
                out.append(("text", p))
        else:
            out.append(("jsonl", p))
    return out


def iter_documents(inputs: list[str], skips: SkipCounter, limit: Optional[int] = None) -> Iterator[RawDoc]:
    """All documents of all inputs, interleaved round-robin across input files (deterministic)."""
    gens = [read_jsonl(p, skips) if kind == "jsonl" else read_text_folder(p, skips) for kind, p in expand_inputs(inputs)]
    n = 0
    while gens:
        alive = []
        for g in gens:
            doc = next(g, None)
            if doc is None:
                continue
            alive.append(g)
            yield doc
            n += 1
            if limit is not None and n >= limit:
                return
        gens = alive

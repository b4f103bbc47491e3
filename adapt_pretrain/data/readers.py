"""Raw-document readers: JSONL / JSONL.gz (plain or SlimPajama shape) and plain-text folders.

Lines are read as bytes and decoded strictly, so a non-UTF-8 document is counted (or raised in
strict mode) instead of being replaced with U+FFFD behind our back. Sources are interleaved
round-robin so every shard mixes domains even when each input file holds a single domain.
"""
from __future__ import annotations

import gzip
import json
import os
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


def read_jsonl(path: str, skips: SkipCounter) -> Iterator[RawDoc]:
    """Documents of one JSONL(.gz) file; a missing domain falls back to the file's stem."""
    opener = gzip.open if path.endswith(".gz") else open
    default_domain = _stem(path)
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            key = f"line {lineno}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                skips.bad("non_utf8", path, key, str(exc))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                skips.bad("invalid_json", path, key, str(exc))
                continue
            if not isinstance(obj, dict):
                skips.bad("invalid_json", path, key, f"expected an object, got {type(obj).__name__}")
                continue
            text = obj.get("text")
            if not isinstance(text, str):
                skips.bad("missing_text", path, key, "no string field 'text'")
                continue
            if not text.strip():
                skips.bad("empty_document", path, key, "text is empty")
                continue
            source = obj.get("source")
            if not isinstance(source, str):
                source = f"{os.path.basename(path)}:{lineno}"
            yield RawDoc(text, _domain_of(obj, default_domain), source)


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

"""Counting, logging or raising on bad input: the one place that decides what a skip means.

Every bad input goes through `SkipCounter.bad(...)`: in strict mode it raises `DataError` naming
the shard (or file) and the key (or line); otherwise it counts the skip under its kind and logs
it, so nothing is dropped silently and the counts can be shown in monitoring.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping

from adapt_pretrain.data.config import DataError

log = logging.getLogger("adapt_pretrain.data")

# kinds of skips, in one list so docs, stats and tests agree
KINDS = (
    "invalid_json",       # prepare: a JSONL line that does not parse / is not an object
    "missing_text",       # prepare: no string `text` field
    "empty_document",     # prepare: empty or whitespace-only text
    "non_utf8",           # prepare: bytes that are not UTF-8
    "damaged_compressed", # prepare: a .gz input truncated, not gzip, or corrupt (lines before the damage kept)
    "shard_missing",      # loader: a shard listed in the manifest cannot be opened
    "shard_corrupt",      # loader: tar truncated or unreadable (samples before the damage are kept)
    "checksum_mismatch",  # loader: shard bytes differ from the manifest's sha256
    "malformed_sample",   # loader: missing .tokens/.json, bad JSON, wrong byte length, missing field
    "token_out_of_vocab", # loader: a token id >= vocab size
)


class SkipCounter:
    """Counts skips by kind; `strict=True` turns the first one into a DataError."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.counts: Counter[str] = Counter()

    def bad(self, kind: str, where: str, key: str, detail: str) -> None:
        assert kind in KINDS, kind
        msg = f"{kind}: {where} key={key}: {detail}"
        if self.strict:
            raise DataError(f"bad input (strict mode) {msg}")
        self.counts[kind] += 1
        log.warning("skipped %s", msg)

    def as_dict(self) -> dict[str, int]:
        return {k: int(self.counts.get(k, 0)) for k in KINDS}


def add_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    keys = set(a) | set(b)
    return {k: int(a.get(k, 0)) + int(b.get(k, 0)) for k in sorted(keys)}

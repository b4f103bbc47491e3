"""Where each document goes in `prepare`: the train split, the validation split, or nowhere (a duplicate).

Decided in reading order, the same way in both passes of `prepare` (tokenizer training reads the
train split; tokenising writes both), so the tokenizer sees exactly the training documents.
"""
from __future__ import annotations

import hashlib
from typing import Optional

from adapt_pretrain.data.readers import RawDoc


class SplitAssigner:
    """Exactly `val_fraction` of each domain's documents (evenly spaced, in reading order) go to val."""

    def __init__(self, val_fraction: float) -> None:
        self.f = float(val_fraction)
        self.seen: dict[str, int] = {}

    def is_val(self, domain: str) -> bool:
        i = self.seen.get(domain, 0)
        self.seen[domain] = i + 1
        return int((i + 1) * self.f) > int(i * self.f)


class DocumentRouter:
    """Split assignment with exact-duplicate handling.

    A document whose text equals an earlier one's (128-bit BLAKE2b of the UTF-8 text) is counted in
    `duplicates` and goes to the split of its first copy, or is dropped with `drop_duplicates`; so
    the same text is never in both train and validation, and `val_fraction` applies to distinct
    texts. Memory: one 16-byte digest per distinct document (about 100 bytes with the dict entry).
    """

    def __init__(self, val_fraction: float, drop_duplicates: bool = False) -> None:
        self.assigner = SplitAssigner(val_fraction)
        self.drop_duplicates = drop_duplicates
        self.first_split: dict[bytes, str] = {}
        self.duplicates = 0

    def route(self, doc: RawDoc) -> Optional[str]:
        """"train", "val", or None (a duplicate being dropped)."""
        key = hashlib.blake2b(doc.text.encode("utf-8"), digest_size=16).digest()
        split = self.first_split.get(key)
        if split is not None:
            self.duplicates += 1
            return None if self.drop_duplicates else split
        split = "val" if self.assigner.is_val(doc.domain) else "train"
        self.first_split[key] = split
        return split


__all__ = ["SplitAssigner", "DocumentRouter"]

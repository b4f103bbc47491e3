"""Derived data directories for offline methods: the prepared data with another training split.

Top-k selection and static mixing decide, per training document, how many copies to keep; this
module writes those copies as ordinary shards plus a manifest in the `prepare` format, reusing the
source's tokenizer, validation split and anchors unchanged. The trainer and loader need no hook:
they just get another `data.data_dir`. Copies get fresh document ids (tar keys must be unique); the
original id is kept in the record as `orig_doc_id`. The write order is a seeded shuffle, so repeats
of one document land in different shards.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from adapt_pretrain.data.manifest import MANIFEST, Manifest, iter_split_records, shard_entry, split_summary, write_manifest
from adapt_pretrain.data.prepare import SplitWriter

DONE = "derived.json"
COPY_STRIDE = 10 ** 8  # copy k of document d gets id d + k * COPY_STRIDE (prepare ids stay far below it)


@dataclass(frozen=True)
class DocInfo:
    """What selection and mixing need about one training document."""

    doc_id: int
    domain: str
    tokens: int
    bm25: float


def doc_table(data_dir: str, split: str = "train") -> list[DocInfo]:
    """One DocInfo per document of `split` (bm25 is 0.0 when the shards carry no score)."""
    return [DocInfo(int(r["doc_id"]), str(r["domain"]), int(r["n_tokens"]), float(r.get("bm25", 0.0)))
            for r, _ in iter_split_records(data_dir, split)]


def is_derived(out_dir: str) -> bool:
    return os.path.isfile(os.path.join(out_dir, DONE)) and os.path.isfile(os.path.join(out_dir, MANIFEST))


def write_derived(src_dir: str, out_dir: str, counts: Mapping[int, int], seed: int, info: Mapping[str, Any],
                  shard_tokens: int | None = None) -> str:
    """Write `out_dir`: train split = each source train document repeated counts[doc_id] times.

    Validation shards, anchors and tokenizer are copied from `src_dir`. `info` (method, fraction,
    weights...) is stored in the manifest under `derived` and in derived.json, which is written
    last: its presence marks a complete directory.
    """
    src = Manifest.load(src_dir)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    copies: list[tuple[int, int]] = []  # (doc index in read order, copy number)
    records: list[tuple[dict[str, Any], np.ndarray]] = []
    for rec, toks in iter_split_records(src_dir):
        n = int(counts.get(int(rec["doc_id"]), 0))
        if n < 0:
            raise ValueError(f"negative repeat count for document {rec['doc_id']}")
        if n:
            copies.extend((len(records), k) for k in range(n))
            records.append((rec, toks))
    if not copies:
        raise ValueError("the derived training split would be empty")
    order = np.random.default_rng(seed).permutation(len(copies))
    src_train = src.raw["splits"]["train"]["shards"]
    per_shard = shard_tokens or max(1, int(np.median([s["tokens"] for s in src_train])))
    writer = SplitWriter(out_dir, "train", src.token_dtype, per_shard)
    for i in order:
        idx, k = copies[i]
        rec, toks = records[idx]
        orig = int(rec["doc_id"])
        new_rec = {key: v for key, v in rec.items() if key not in ("doc_id", "n_tokens")}
        new_rec["orig_doc_id"] = orig
        writer.write(orig + k * COPY_STRIDE, toks, new_rec)
    writer.close()
    entries = [shard_entry(out_dir, sf) for sf in writer.done]
    for name in ("tokenizer.json", "anchors.tar", "val"):
        path = os.path.join(src_dir, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(out_dir, name))
        elif os.path.exists(path):
            shutil.copy2(path, os.path.join(out_dir, name))
    raw = json.loads(json.dumps(src.raw))
    raw["splits"]["train"] = split_summary(entries)
    raw["derived"] = {"source": os.path.abspath(src_dir), "seed": seed, **dict(info),
                      "unique_docs": len(records), "copies": len(copies)}
    write_manifest(out_dir, raw)
    with open(os.path.join(out_dir, DONE), "w", encoding="utf-8") as fh:
        json.dump(raw["derived"], fh, indent=1, sort_keys=True)
    return out_dir


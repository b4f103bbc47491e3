"""The BM25 pass of `prepare`: score every shard's documents against the anchors (bm25.py), z-score the
scores over all documents, and rewrite each shard with the score in its records (workers in parallel)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from typing import Any

import numpy as np

from adapt_pretrain.data.bm25 import BM25Scorer
from adapt_pretrain.data.config import PrepareConfig
from adapt_pretrain.data.shardio import ShardFile, iter_raw_samples, read_shard
from adapt_pretrain.data.skips import SkipCounter


def bm25_pass(cfg: PrepareConfig, files: list[ShardFile], df: np.ndarray, num_docs: int, total_tokens: int,
               anchors: list[np.ndarray], dtype: str, vocab: int, domains: list[str]) -> dict[str, Any]:
    """Score every document of every shard against the anchors, z-score over all documents, and write
    `bm25` into each record (shards rewritten in place); returns the manifest's `bm25` entry."""
    scorer = BM25Scorer.build(df, num_docs, total_tokens, anchors, cfg.bm25_k1, cfg.bm25_b)
    dom = {d: i for i, d in enumerate(domains)}
    paths = [os.path.join(cfg.out_dir, sf.name) for sf in files]  # type: ignore[attr-defined]
    n_data = len(paths) - (1 if paths and paths[-1].endswith("anchors.tar") else 0)
    args = [(p, dtype, vocab, dom, scorer) for p in paths]
    runner = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(cfg.num_workers) \
        if cfg.num_workers > 1 else None
    try:
        mapper = runner.map if runner else lambda f, a: list(map(f, a))
        scores = np.concatenate([np.asarray(s, dtype=np.float64) for s in mapper(_shard_scores, args[:n_data])] or [np.zeros(0)])
        mean, std = float(scores.mean()), float(scores.std()) or 1.0
        list(mapper(_rewrite_shard, [a + (mean, std) for a in args]))
    finally:
        if runner:
            runner.close()
            runner.join()
    return {"enabled": True, "k1": cfg.bm25_k1, "b": cfg.bm25_b, "raw_mean": mean, "raw_std": std,
            "num_anchors": len(anchors), "zscored_over": "all train+val documents"}


def _shard_scores(args: tuple) -> list[float]:
    path, dtype, vocab, domains, scorer = args
    docs = read_shard(path, path, SkipCounter(strict=True), dtype, vocab, domains)
    return [scorer.score(d.tokens) for d in docs]


def _rewrite_shard(args: tuple) -> None:
    """Rewrite one shard with `bm25` (z-scored) added to every JSON record."""
    path, dtype, vocab, domains, scorer, mean, std = args
    with open(path, "rb") as f:
        data = f.read()
    samples = list(iter_raw_samples(data, path, SkipCounter(strict=True)))
    sf = ShardFile(path + ".tmp", dtype)
    for s in samples:
        rec = json.loads(s["json"])
        toks = np.frombuffer(s["tokens"], dtype=np.dtype(dtype).newbyteorder("<")).astype(np.int64)
        rec["bm25"] = (scorer.score(toks) - mean) / std
        sf.write(rec.pop("doc_id"), toks, rec)
    sf.close()
    os.replace(path + ".tmp", path)

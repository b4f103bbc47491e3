"""Offline data steps of the comparison, done once before training: top-k subsets and static mixes.

Each builder writes a derived data directory (see derive.py) and returns its path; an existing
complete directory is reused, so an interrupted comparison does not redo them. The embedding scores
come from a proxy model (a short uniform run), scored in a subprocess via this module's `main`
so the comparison process never holds a torch.distributed group while it launches training runs.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Mapping

import numpy as np

from adapt_pretrain.data.manifest import iter_split_records
from adapt_pretrain.experiments.methods.derive import DONE, doc_table, is_derived, write_derived
from adapt_pretrain.experiments.methods.mixing import plan_mixture
from adapt_pretrain.experiments.methods.selection import centroid_scores, select_top_fraction


def bm25_scores(data_dir: str) -> tuple[list[int], list[float], list[int]]:
    """(doc ids, z-scored BM25-to-anchors scores, tokens) of the training split; needs prepare --bm25."""
    from adapt_pretrain.data.manifest import Manifest

    if not (Manifest.load(data_dir).raw.get("bm25") or {}).get("enabled"):
        raise ValueError(f"{data_dir} was prepared without BM25 scores (prepare.bm25: true)")
    table = doc_table(data_dir)
    return [d.doc_id for d in table], [d.bm25 for d in table], [d.tokens for d in table]


def _up_to_date(out_dir: str, info: Mapping[str, Any]) -> bool:
    """A complete derived dir built with exactly these settings (else it is rebuilt)."""
    if not is_derived(out_dir):
        return False
    with open(os.path.join(out_dir, DONE), encoding="utf-8") as fh:
        stored = json.load(fh)
    return all(stored.get(k) == json.loads(json.dumps(v)) for k, v in info.items())


def build_topk(data_dir: str, out_dir: str, doc_ids: list[int], scores: list[float], tokens: list[int],
               fraction: float, seed: int, info: Mapping[str, Any]) -> str:
    """Derived dir holding the top `fraction` of training tokens by score (each kept document once)."""
    info = {**info, "fraction": float(fraction)}
    if _up_to_date(out_dir, info):
        return out_dir
    keep = select_top_fraction(doc_ids, scores, tokens, fraction)
    return write_derived(data_dir, out_dir, {d: 1 for d in keep}, seed, info)


def build_static_mix(data_dir: str, out_dir: str, weights: Mapping[str, float], seed: int) -> str:
    """Derived dir whose training split holds each domain's share of tokens given by `weights`."""
    info = {"method": "static-mix", "weights": {k: float(v) for k, v in weights.items()}}
    if _up_to_date(out_dir, info):
        return out_dir
    table = doc_table(data_dir)
    total = sum(d.tokens for d in table)
    counts = plan_mixture([(d.doc_id, d.domain, d.tokens) for d in table], weights, total, seed)
    return write_derived(data_dir, out_dir, counts, seed, info)


def embed_scores(run_dir: str, data_dir: str, num_anchors: int | None = None, prefix: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Proxy-model similarity of every training document to the anchor centroid (selection.centroid_scores, offline)."""
    from adapt_pretrain.data.anchors import load_anchor_docs
    from adapt_pretrain.trained_model import document_embeddings, load_run_model

    model = load_run_model(run_dir)
    anchors = [d.tokens for d in load_anchor_docs(data_dir)][:num_anchors]
    ids, toks, docs = [], [], []
    for rec, arr in iter_split_records(data_dir):
        ids.append(int(rec["doc_id"]))
        toks.append(int(rec["n_tokens"]))
        docs.append(arr.astype(np.int64))
    cut = min(prefix or model.seq_len, model.seq_len)
    anchor_emb = document_embeddings(model, anchors, max_tokens=cut)
    doc_emb = document_embeddings(model, docs, max_tokens=cut, progress=progress)
    scores = centroid_scores(doc_emb, anchor_emb)
    seen = sum(min(len(d), cut) for d in docs) + sum(min(len(a), cut) for a in anchors)
    return {"doc_ids": ids, "scores": [float(s) for s in scores], "tokens": toks, "embed_tokens": int(seen)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapt_pretrain.experiments.methods.offline",
                                description="score training documents with a proxy run's embeddings")
    p.add_argument("--run", required=True, help="the proxy run's directory (its final checkpoint is loaded)")
    p.add_argument("--data", required=True, help="prepared data directory whose training documents are scored")
    p.add_argument("--num-anchors", type=int, default=None,
                   help="anchor documents the centroid is built from (default: every anchor of the data dir)")
    p.add_argument("--prefix", type=int, default=None, help="embed only the first N tokens of each document")
    p.add_argument("--out", required=True, help="JSON file to write: doc_ids, scores, tokens, embed_tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for a log file)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = embed_scores(args.run, args.data, args.num_anchors, args.prefix, progress=not args.no_progress)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    os.replace(tmp, args.out)
    print(f"scored {len(result['doc_ids'])} documents -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

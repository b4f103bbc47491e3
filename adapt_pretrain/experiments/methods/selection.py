"""Offline top-k selection: keep the best-scoring documents covering a fraction of the tokens.

Why by tokens and not by documents: the comparison is at equal training tokens, and documents
differ in length by orders of magnitude; a document-count cut would make "25%" mean anything.
Deterministic: ties in score are broken by document id, so the same scores always give the same set.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def select_top_fraction(doc_ids: Sequence[int], scores: Sequence[float], tokens: Sequence[int],
                        fraction: float) -> list[int]:
    """Document ids of the highest-scoring documents whose tokens first reach `fraction` of the total.

    Documents are ranked by score (descending), ties by doc id (ascending); they are taken in that
    order until the selected tokens are >= fraction * total tokens (the document that crosses the
    threshold is kept, so the subset is never short). Returns ids in rank order.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"selection fraction={fraction} must be in (0, 1]")
    ids = np.asarray(doc_ids, dtype=np.int64)
    sc = np.asarray(scores, dtype=np.float64)
    tk = np.asarray(tokens, dtype=np.int64)
    if not (ids.shape == sc.shape == tk.shape):
        raise ValueError("doc_ids, scores and tokens must have the same length")
    if ids.size == 0:
        return []
    if not np.isfinite(sc).all():
        raise ValueError("scores must be finite")
    order = np.lexsort((ids, -sc))  # primary: score descending; secondary: id ascending
    target = fraction * float(tk.sum())
    cum = np.cumsum(tk[order])
    n = int(np.searchsorted(cum, target, side="left")) + 1  # first prefix whose sum >= target
    return [int(i) for i in ids[order[:min(n, ids.size)]]]


def centroid_scores(doc_embeddings: np.ndarray, anchor_embeddings: np.ndarray) -> np.ndarray:
    """ADAPT's similarity for offline use: unit doc vectors . mean of unit anchor vectors (core/pooling.py, core/anchors.py)."""
    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norm, 1e-12)

    centroid = unit(anchor_embeddings).mean(axis=0)
    return unit(doc_embeddings) @ centroid

"""Static BM25 signal: mean Okapi BM25 of each document against the anchor documents.

Terms are token ids, so no second tokenizer is needed. Averaging BM25(q=a, d) over anchors a is
linear in the query, so it collapses to one weighted sum with q_w[t] = (#anchors containing t)/|A|:
one pass per document regardless of the number of anchors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BM25Scorer:
    idf: np.ndarray          # [V] float64
    query_weight: np.ndarray  # [V] float64: share of anchors containing each term
    avgdl: float
    k1: float = 1.2
    b: float = 0.75

    @classmethod
    def build(cls, df: np.ndarray, num_docs: int, total_tokens: int, anchors: list[np.ndarray],
              k1: float = 1.2, b: float = 0.75) -> "BM25Scorer":
        idf = np.log((num_docs - df + 0.5) / (df + 0.5) + 1.0)  # Lucene variant: never negative
        qw = np.zeros_like(idf)
        for a in anchors:
            qw[np.unique(a)] += 1.0
        qw /= max(len(anchors), 1)
        return cls(idf, qw, total_tokens / max(num_docs, 1), k1, b)

    def score(self, tokens: np.ndarray) -> float:
        terms, tf = np.unique(tokens, return_counts=True)
        norm = self.k1 * (1.0 - self.b + self.b * tokens.size / self.avgdl)
        contrib = self.query_weight[terms] * self.idf[terms] * tf * (self.k1 + 1.0) / (tf + norm)
        return float(contrib.sum())

"""Document packing: a stream of documents -> [seq_len + 1] windows -> micro-batches with token groups.

The stream is the documents' tokens, each followed by EOS, laid end to end. Window j covers stream
tokens [j*s, j*s + s] (consecutive windows share one token, so every token is predicted once):
inputs are the first s, labels the last s. A *group* is a maximal run of one document among a
window's inputs (docs/DATA.md); a document cut by a window boundary gives one group per window.
loss_mask is 1 where the label is a token (or the EOS) of the same document as the input token.
Each window records where the next one starts (document location + offset) so a loader can
resume exactly from any window boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

IGNORE = -100  # label at padding positions (torch cross_entropy's default ignore_index)


@dataclass
class StreamDoc:
    """A document placed in a stream: `loc` is a resumable location (e.g. shard/doc index)."""

    tokens: np.ndarray  # int64 without EOS
    domain: int
    doc_id: int
    bm25: float
    loc: Any
    start: int = 0  # first token offset (into tokens + EOS) to use; non-zero only on resume


@dataclass
class Window:
    """One packed sequence: `len(tokens)` <= s + 1 (shorter only at the end of a finite stream)."""

    tokens: np.ndarray           # [n] int64, n <= s + 1
    piece_len: list[int]         # lengths of the document runs that make up `tokens`
    piece_meta: list[tuple[int, int, float]]  # (domain, doc_id, bm25) per run
    next_loc: Optional[tuple[Any, int]]  # where the next window starts: (doc loc, offset); None at end


def pack_windows(docs: Iterator[StreamDoc], seq_len: int, eos_id: int) -> Iterator[Window]:
    """Cut the EOS-joined document stream into windows of seq_len + 1 tokens overlapping by one."""
    need = seq_len + 1
    toks: list[np.ndarray] = []
    lens: list[int] = []
    meta: list[tuple[int, int, float]] = []
    filled = 0
    for doc in docs:
        ext = np.concatenate([doc.tokens, np.array([eos_id], dtype=np.int64)])
        a = doc.start
        m = (doc.domain, doc.doc_id, doc.bm25)
        first_piece = True
        while a < ext.size:
            take = min(need - filled, ext.size - a)
            toks.append(ext[a:a + take])
            if first_piece or not lens:
                lens.append(take)
                meta.append(m)
            else:  # continuing the same document right after a window restart
                lens[-1] += take
            first_piece = False
            filled += take
            a += take
            if filled == need:
                yield Window(np.concatenate(toks), lens, meta, (doc.loc, a - 1))
                # the next window starts with this window's last token (same document)
                toks, lens, meta, filled = [ext[a - 1:a]], [1], [m], 1
    if filled > 1:
        yield Window(np.concatenate(toks), lens, meta, None)


def collate(windows: list[Window], batch: int, seq_len: int, eos_id: int) -> dict[str, Any]:
    """Build the TEAM_CONTRACTS micro-batch from up to `batch` windows (missing rows are padding)."""
    s = seq_len
    tokens = np.full((batch, s), eos_id, dtype=np.int64)
    labels = np.full((batch, s), IGNORE, dtype=np.int64)
    loss_mask = np.zeros((batch, s), dtype=np.float32)
    group_id = np.full((batch, s), -1, dtype=np.int64)
    position = np.zeros((batch, s), dtype=np.int64)
    g_dom: list[int] = []
    g_doc: list[int] = []
    g_bm: list[float] = []
    for r, w in enumerate(windows):
        n_in = w.tokens.size - 1  # inputs with a label
        tokens[r, :n_in] = w.tokens[:n_in]
        labels[r, :n_in] = w.tokens[1:]
        start = 0
        for length, (dom, doc, bm) in zip(w.piece_len, w.piece_meta):
            a, b = start, min(start + length, n_in)
            start += length
            if a >= n_in:
                break  # a run made only of the final (label-only) token
            gid = len(g_dom)
            g_dom.append(dom)
            g_doc.append(doc)
            g_bm.append(bm)
            group_id[r, a:b] = gid
            position[r, a:b] = np.arange(1, b - a + 1)
            # label t+1 belongs to the same document for every input of the run but its last,
            # and for the last too when the run continues past it (run extends to the label)
            loss_mask[r, a:b - 1] = 1.0
            if start > b:  # the run goes on beyond the input range: its last label is this doc's
                loss_mask[r, b - 1] = 1.0
    # numpy here: crossing the DataLoader worker pipe as pickled arrays is ~20x cheaper than torch
    # tensors (those go through one shared-memory file descriptor each); `as_torch` converts after
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "group_id": group_id, "position": position,
            "group_domain": np.asarray(g_dom, dtype=np.int64), "group_doc_id": np.asarray(g_doc, dtype=np.int64),
            "group_bm25": np.asarray(g_bm, dtype=np.float32), "num_groups": len(g_dom)}


def as_torch(batch: dict[str, Any]) -> dict[str, Any]:
    """numpy micro-batch -> torch tensors (zero-copy); other values unchanged."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def anchor_collate(docs: list[StreamDoc], batch: int, seq_len: int, eos_id: int) -> dict[str, Any]:
    """Each document one sequence and one group, truncated to seq_len inputs (for anchor encoding)."""
    windows = []
    for d in docs:
        ext = np.concatenate([d.tokens, np.array([eos_id], dtype=np.int64)])[: seq_len + 1]
        windows.append(Window(ext, [ext.size], [(d.domain, d.doc_id, d.bm25)], None))
    return as_torch(collate(windows, batch, seq_len, eos_id))

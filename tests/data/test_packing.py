"""Packing on synthetic documents, checked against expectations computed token by token."""
from __future__ import annotations

import numpy as np

from adapt_pretrain.data.packing import IGNORE, StreamDoc, as_torch, collate, pack_windows

EOS = 0


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [StreamDoc(rng.integers(1, 50, size=n).astype(np.int64), i % 3, 100 + i, float(i), ("x", i))
            for i, n in enumerate(lengths)]


def _reference_stream(docs):
    """Token stream and per-token document index, built independently of the packer."""
    toks, owner = [], []
    for i, d in enumerate(docs):
        toks += list(d.tokens) + [EOS]
        owner += [i] * (len(d.tokens) + 1)
    return np.array(toks), np.array(owner)


def test_windows_cover_stream_with_one_token_overlap():
    docs = _docs([5, 1, 17, 3, 40, 2, 9])
    s = 8
    stream, _ = _reference_stream(docs)
    wins = list(pack_windows(iter(docs), s, EOS))
    assert len(wins) == int(np.ceil((len(stream) - 1) / s))
    for j, w in enumerate(wins):
        np.testing.assert_array_equal(w.tokens, stream[j * s: j * s + s + 1])


def test_groups_positions_masks_match_source_documents():
    docs = _docs([5, 1, 17, 3, 40, 2, 9, 1, 1, 30])
    s, b = 8, 3
    stream, owner = _reference_stream(docs)
    wins = list(pack_windows(iter(docs), s, EOS))
    seen_inputs = np.zeros(len(stream), dtype=int)
    for start in range(0, len(wins), b):
        chunk = wins[start:start + b]
        batch = as_torch(collate(chunk, b, s, EOS))
        G = batch["num_groups"]
        gid = batch["group_id"].numpy()
        assert sorted(set(gid[gid >= 0].tolist())) == list(range(G))  # unique over the micro-batch, 0..G-1
        for r in range(b):
            base = (start + r) * s  # stream offset of this row's first input
            for t in range(s):
                p = base + t
                if r >= len(chunk) or p >= len(stream) - 1:  # padding
                    assert gid[r, t] == -1 and batch["position"][r, t] == 0
                    assert batch["loss_mask"][r, t] == 0 and batch["labels"][r, t] == IGNORE
                    continue
                seen_inputs[p] += 1
                assert batch["tokens"][r, t] == stream[p] and batch["labels"][r, t] == stream[p + 1]
                assert batch["loss_mask"][r, t] == float(owner[p] == owner[p + 1])
                g = gid[r, t]
                doc = docs[owner[p]]
                assert batch["group_doc_id"][g] == doc.doc_id and batch["group_domain"][g] == doc.domain
                assert batch["group_bm25"][g] == np.float32(doc.bm25)
                # position: 1 + number of earlier inputs of the same document in this row
                row_start = max(base, int(np.argmax(owner == owner[p])))
                assert batch["position"][r, t] == p - row_start + 1
                # a group never spans two documents or two rows
                same = gid[r] == g
                assert set(owner[base + np.nonzero(same)[0]].tolist()) == {owner[p]}
                assert not any((gid[rr] == g).any() for rr in range(b) if rr != r)
    # every stream token but the last is an input exactly once
    assert seen_inputs[:-1].tolist() == [1] * (len(stream) - 1)


def test_document_split_across_sequences_gives_two_groups():
    docs = _docs([20])
    batch = as_torch(collate(list(pack_windows(iter(docs), 8, EOS)), 3, 8, EOS))
    # 21 stream tokens -> inputs 0..19 -> rows of 8, 8, 4: three groups of the same document
    assert batch["num_groups"] == 3
    assert batch["group_doc_id"].tolist() == [100, 100, 100]
    assert batch["position"][1, :3].tolist() == [1, 2, 3]
    assert batch["loss_mask"][2, :4].tolist() == [1, 1, 1, 1]  # last input's label is the doc's EOS


def test_resume_from_window_location_reproduces_remaining_windows():
    docs = _docs([5, 1, 17, 3, 40, 2, 9])
    s = 6
    full = list(pack_windows(iter(docs), s, EOS))
    for k in range(len(full) - 1):
        (doc_loc, offset) = full[k].next_loc
        i = doc_loc[1]
        rest = [StreamDoc(d.tokens, d.domain, d.doc_id, d.bm25, d.loc, offset if j == 0 else 0)
                for j, d in enumerate(docs[i:])]
        again = list(pack_windows(iter(rest), s, EOS))
        assert len(again) == len(full) - k - 1
        for a, b in zip(again, full[k + 1:]):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            assert a.piece_len == b.piece_len and a.piece_meta == b.piece_meta

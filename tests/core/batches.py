"""Small packed batches built independently of the data pipeline, for core tests."""
from __future__ import annotations

import torch


def packed_batch(doc_lengths: list[int], hidden_size: int = 8, vocab: int = 50, seed: int = 0, pad: int = 0):
    """One flat sequence of documents (group g = document g) plus `pad` padding tokens."""
    gen = torch.Generator().manual_seed(seed)
    group_ids = torch.cat([torch.full((n,), g, dtype=torch.long) for g, n in enumerate(doc_lengths)]
                          + [torch.full((pad,), -1, dtype=torch.long)])
    positions = torch.cat([torch.arange(1, n + 1) for n in doc_lengths] + [torch.zeros(pad, dtype=torch.long)])
    T = group_ids.numel()
    hidden = torch.randn(T, hidden_size, generator=gen, dtype=torch.float64)
    logits = torch.randn(T, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (T,), generator=gen)
    loss_mask = (group_ids >= 0).double()
    return dict(hidden=hidden, logits=logits, labels=labels, loss_mask=loss_mask, group_ids=group_ids,
                positions=positions, num_groups=len(doc_lengths))

"""Weighted loss assembly (docs/METHOD.md), returning a sum and its normaliser separately.

Returning `(sum m w l, normaliser)` instead of a ratio lets the caller normalise over the *global*
batch (all micro-batches and data-parallel ranks), which is what keeps any parallel layout equal to
a single process (docs/PARALLELISM.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapt_pretrain.kernels import reference, weighted_cross_entropy

IGNORE_INDEX = -100  # torch's default; the data stream writes it at padding


@dataclass
class LossTerms:
    loss_sum: torch.Tensor     # 0-dim, differentiable: sum_t m_t w_t l_t
    normaliser: torch.Tensor   # 0-dim, detached: this micro-batch's share of the global normaliser
    token_loss: torch.Tensor   # [T] plain cross-entropy, detached (monitoring, LinUpper)
    weights: torch.Tensor      # [G] the group weights actually applied


def plain_token_loss(logits: torch.Tensor, labels: torch.Tensor, tp_group=None, vocab_start: int = 0) -> torch.Tensor:
    """Unweighted per-token cross-entropy; the exact computation plain training uses."""
    if tp_group is None:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    ones = torch.ones(1, dtype=torch.float32, device=logits.device)
    zeros = torch.zeros_like(labels)
    weighted, _ = weighted_cross_entropy(logits, labels, zeros, ones, tp_group=tp_group, vocab_start=vocab_start)
    return weighted


def token_weights(labels: torch.Tensor, group_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-group weights gathered onto tokens; 0 for padding (group -1) and ignored labels."""
    return reference.token_weights(labels, group_ids, weights, IGNORE_INDEX)


def counted_tokens(loss_mask: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """The loss mask restricted to tokens that carry a loss (a label other than IGNORE_INDEX and a
    group other than padding -1), as fp32 [T]. Such a token has no loss (and weight 0), so counting it
    in a normaliser would dilute the loss by tokens that contribute nothing."""
    carries = (labels != IGNORE_INDEX) & (group_ids >= 0)
    return loss_mask.float() * carries.float()


def normaliser_for(mode: str, counted: torch.Tensor, tok_weights: torch.Tensor | None,
                   num_contributions: int) -> torch.Tensor:
    """This micro-batch's share of the global normaliser for `weights`, `tokens` or `sum` mode.

    `counted` comes from `counted_tokens`: `weights` sums m w and `tokens` sums m over the tokens that
    carry a loss. For `sum` the global normaliser must be 1: each of the `num_contributions`
    micro-batches (micro-batches x data-parallel ranks) contributes 1 / num_contributions.
    """
    if mode == "weights":
        if tok_weights is None:
            raise ValueError("normalize=weights needs the token weights")
        return (counted * tok_weights).sum().detach()
    if mode == "tokens":
        return counted.sum().detach()
    if mode == "sum":
        return torch.tensor(1.0 / num_contributions, dtype=torch.float32, device=counted.device)
    raise ValueError(f"unknown normalisation mode {mode!r}")


def weighted_loss_terms(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor,
                        weights: torch.Tensor, mode: str, tp_group=None, vocab_start: int = 0,
                        num_contributions: int = 1) -> LossTerms:
    """Fused weighted CE (weights gathered by group id in the kernel) plus the normaliser."""
    weighted, token_loss = weighted_cross_entropy(logits, labels, group_ids, weights.float(),
                                                  tp_group=tp_group, vocab_start=vocab_start)
    loss_sum = (weighted * loss_mask.float()).sum()
    tok_w = token_weights(labels, group_ids, weights) if mode == "weights" else None
    counted = counted_tokens(loss_mask, labels, group_ids)
    return LossTerms(loss_sum, normaliser_for(mode, counted, tok_w, num_contributions), token_loss, weights.detach())

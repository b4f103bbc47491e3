"""ADAPT training in one process, plain torch and float64, sharing no code with the package.

The method as specified (docs/METHOD.md): a group's embedding is the position-weighted sum of the
final hidden states (the LM head's input) of its tokens, L2-normalised; the anchor centroid is the
mean of the anchors' unit embeddings; the score is embedding . centroid; the weight is
clamp(sigmoid(score / tau), w_min, w_max); the loss is sum(m w l) / sum(m w) over the whole global
batch; gradients are clipped by global norm, then plain SGD.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


def _final_hidden(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, H]: the decoder's output after the final norm (what the LM head multiplies)."""
    return model.model(input_ids=tokens).last_hidden_state


def _unit_group_embeddings(hidden: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """[G, H] unit vectors of sum_t position[t] * h_t over each group's tokens (zero rows stay zero)."""
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    gid = batch["group_id"].reshape(-1)
    pos = batch["position"].reshape(-1).to(h.dtype)
    rows = []
    for g in range(int(batch["num_groups"])):
        sel = gid == g
        pooled = (h[sel] * pos[sel, None]).sum(0)
        norm = pooled.norm()
        rows.append(pooled / norm if norm > 0 else pooled)
    return torch.stack(rows) if rows else h.new_zeros(0, h.shape[1])


def centroid(model: Any, anchor_batches: list[dict[str, Any]]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        units = torch.cat([_unit_group_embeddings(_final_hidden(model, b["tokens"]), b) for b in anchor_batches])
    model.train()
    valid = units.norm(dim=1) > 0
    return units[valid].sum(0) / valid.sum()


def weighted_terms(model: Any, batch: dict[str, Any], center: torch.Tensor, tau: float, w_min: float,
                   w_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum m w l, sum m w) of one micro-batch; w is constant (no gradient through the weights)."""
    hidden = _final_hidden(model, batch["tokens"])
    logits = model.lm_head(hidden)
    scores = _unit_group_embeddings(hidden, batch) @ center
    weights = torch.sigmoid(scores / tau).clamp(w_min, w_max)
    labels = batch["labels"].reshape(-1)
    gid = batch["group_id"].reshape(-1)
    counted = (labels != IGNORE) & (gid >= 0)
    token_w = torch.where(counted, weights[gid.clamp(min=0)], torch.zeros((), dtype=weights.dtype))
    m = batch["loss_mask"].reshape(-1).to(logits.dtype)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="none", ignore_index=IGNORE)
    return (m * token_w * ce).sum(), (m * token_w).sum()


def train(model: Any, steps: list[list[dict[str, Any]]], anchor_batches: list[dict[str, Any]], tau: float,
          w_min: float, w_max: float, lr: float, clip: float) -> dict[str, Any]:
    """Run len(steps) SGD steps, each on the listed micro-batches (the global batch) in float64.

    Returns the final parameters, the loss and pre-clip gradient norm of every step.
    """
    model = copy.deepcopy(model).double()
    center = centroid(model, anchor_batches)  # refreshed once, at step 0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses, norms = [], []
    for micro_batches in steps:
        optimizer.zero_grad()
        terms = [weighted_terms(model, b, center, tau, w_min, w_max) for b in micro_batches]
        total = sum(t[0] for t in terms) / sum(t[1] for t in terms)
        total.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        losses.append(float(total))
        optimizer.step()
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "losses": losses,
            "grad_norms": norms}

"""Micro-batch plumbing between the data stream's dicts (TEAM_CONTRACTS) and megatron's layout.

GPTModel takes [b, s] tokens and returns logits as [b, s, V_local] but its final hidden states are
[s, b, H] (or [s/tp, b, H] with sequence parallelism). Token-indexed side data (group ids,
positions) is therefore flattened in two orders: b-major for the loss (matches logits) and
s-major, sliced to this TP rank's sequence shard, for pooling (matches hidden; no copy of hidden).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

TENSOR_KEYS = ("tokens", "labels", "loss_mask", "group_id", "position", "group_domain", "group_doc_id", "group_bm25")
REQUIRED_KEYS = ("tokens", "labels", "loss_mask", "group_id", "position", "num_groups")


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move the tensors of one micro-batch to `device` (others pass through); validates keys."""
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise KeyError(f"micro-batch lacks {', '.join(missing)} (format: docs/TEAM_CONTRACTS.md)")
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
    out["num_groups"] = int(batch["num_groups"])
    return out


def shape_of(micro_batches: list[dict[str, Any]]) -> tuple[int, int]:
    """(micro_batch_size, seq_len), identical over the list (pipeline p2p shapes are fixed)."""
    shapes = {tuple(mb["tokens"].shape) for mb in micro_batches}
    if len(shapes) != 1:
        raise ValueError(f"all micro-batches of one schedule call must have the same [b, s]; got {sorted(shapes)}")
    b, s = shapes.pop()
    return b, s


def chunk_iterators(micro_batches: list[dict[str, Any]], num_chunks: int) -> list[Iterator[dict[str, Any]]] | Iterator:
    """One iterator per model chunk over the same micro-batches (each chunk consumes all of them)."""
    if num_chunks == 1:
        return iter(micro_batches)
    return [iter(micro_batches) for _ in range(num_chunks)]


def pooling_view(batch: dict[str, Any], key: str, tp_rank: int, tp_size: int, sequence_parallel: bool) -> torch.Tensor:
    """`batch[key]` [b, s] flattened s-major ([s, b] like megatron hidden), sliced to this rank's
    sequence shard under sequence parallelism."""
    value = batch[key].t()
    if sequence_parallel and tp_size > 1:
        local = value.shape[0] // tp_size
        value = value[tp_rank * local:(tp_rank + 1) * local]
    return value.reshape(-1)


def padding_micro_batch(template: dict[str, Any]) -> dict[str, Any]:
    """A micro-batch shaped like `template` whose tokens belong to no group (contributes nothing);
    used to round a forward-only call up to what the interleaved schedule accepts."""
    pad = dict(template)
    pad["group_id"] = torch.full_like(template["group_id"], -1)
    pad["position"] = torch.zeros_like(template["position"])
    pad["loss_mask"] = torch.zeros_like(template["loss_mask"])
    return pad

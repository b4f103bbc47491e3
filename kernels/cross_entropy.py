"""Weighted cross-entropy: one autograd Function driving either the Triton or the torch phases.

Forward: row statistics -> (all-reduce over the tensor-parallel group) -> finalize. It saves the
logits and a per-row fp32 logsumexp, nothing else of size [T, V]. Backward: one pass writing
w_t * g_t * (softmax - onehot), optionally into the logits buffer. With in-place backward the CPU
path already turns the logits buffer into its log-softmax in the forward (and saves the local
logsumexp to undo the shift). Group weights are detached by design (ADAPT weights are a
learning-rate multiplier, not a learned quantity).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Optional

import torch

from . import reference
from ._dispatch import use_triton
from ._vocab_parallel import allreduce_row_stats


def _ops_for(logits: torch.Tensor) -> ModuleType:
    if use_triton(logits):
        from . import triton_ce  # lazy: importing triton fixes its interpreter mode

        return triton_ce
    return reference


class WeightedCrossEntropy(torch.autograd.Function):
    """Autograd wrapper; `ops` is `reference` or `triton_ce` (same three-phase interface)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, group_ids: torch.Tensor,
                group_weights: torch.Tensor, ignore_index: int, inplace_backward: bool,
                tp_group: Optional[Any], vocab_start: int, ops: ModuleType):
        m, d, xt, overwritten = ops.ce_stats(logits, targets, vocab_start, ignore_index, overwrite=inplace_backward)
        local_lse = m if overwritten else None  # the buffer now holds x - local_lse
        m, d, xt = allreduce_row_stats(m, d, xt, tp_group)
        lse, loss, wloss = ops.ce_finalize(m, d, xt, targets, group_ids, group_weights, ignore_index)
        ctx.save_for_backward(logits, lse, targets, group_ids, group_weights, local_lse)
        ctx.config = (ignore_index, inplace_backward, vocab_start, ops, tp_group is None)
        ctx.mark_non_differentiable(loss)
        return wloss, loss

    @staticmethod
    def backward(ctx: Any, grad_wloss: Optional[torch.Tensor], _grad_loss: Any):
        ignore_index, inplace, vocab_start, ops, full_vocab = ctx.config
        if grad_wloss is None or not ctx.needs_input_grad[0]:
            return (None,) * 9
        logits, lse, targets, group_ids, group_weights, local_lse = ctx.saved_tensors
        out = logits if inplace else torch.empty_like(logits)
        ops.ce_grad(logits, lse, targets, group_ids, group_weights, grad_wloss.float(),
                    vocab_start, ignore_index, out, full_vocab=full_vocab, local_lse=local_lse)
        if inplace:
            # Kernels write behind autograd's back: bump the version so any other saved use of
            # these logits fails loudly instead of silently reading gradients.
            torch.autograd.graph.increment_version(out)
        return (out,) + (None,) * 8


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group_ids: torch.Tensor,
                           group_weights: torch.Tensor, ignore_index: int = -100,
                           inplace_backward: bool = False, tp_group: Optional[Any] = None,
                           vocab_start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (w[group_ids[t]] * CE_t, CE_t), both fp32 [T].

    The first output is differentiable w.r.t. `logits`; the second is plain CE, detached. Both
    are 0 for `ignore_index` targets; the weighted one is also 0 for padding (group -1).
    With `tp_group`, `logits` is this rank's vocab shard starting at global index `vocab_start`
    (shards may be uneven) and the result equals the full-vocab one on every rank.
    `inplace_backward=True` hands the logits buffer to the kernel: the gradient is written into it
    and, on the CPU path with fp32 logits, the forward already overwrites it with its log-softmax
    (as megatron's vocab-parallel CE overwrites fp32 logits with the softmax). Only allowed when
    nothing reads these logits after the loss (e.g. they come straight out of the output layer);
    the version counter is bumped, so another autograd use of them fails loudly.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, V], got shape {tuple(logits.shape)}")
    T = logits.shape[0]
    if targets.shape != (T,) or group_ids.shape != (T,):
        raise ValueError("targets and group_ids must be [T] matching logits")
    if group_weights.dim() != 1:
        raise ValueError("group_weights must be [G]")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    ops = _ops_for(logits)
    return WeightedCrossEntropy.apply(
        logits, targets.long().contiguous(), group_ids.long().contiguous(),
        group_weights.detach().float().contiguous(), int(ignore_index), bool(inplace_backward),
        tp_group, int(vocab_start), ops)

"""Triton kernels for the weighted cross-entropy, in three phases.

1. `stats`: one program per row streams the row once (online softmax) and writes the row max,
   the sum of exp(x - max) and the target logit (0 when the target is in another vocab shard).
2. `finalize` (after the optional all-reduce over the tensor-parallel group): logsumexp, plain
   CE and weighted CE; the group weight is gathered by group id here, inside the kernel.
3. `grad`: one program per (row, vocab block) writes w_t * g_t * (softmax - onehot) into a fresh
   buffer or into the logits buffer itself (in-place backward). `GRAD_SPLIT_V = False` selects the
   previous layout, one program per row looping over its vocab blocks (kept for the comparison in
   benchmarks/bench_loss.py: on an H200 that layout's in-place backward was slower than its copying
   one; the split grid has no loop for the compiler to pipeline and T x V/BLOCK programs in flight).
The only state kept between forward and backward is the logits and one fp32 logsumexp per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest vocab block one program loads at a time; tests lower it to exercise the block loop.
MAX_BLOCK_V = 16384
GRAD_BLOCK_V = 4096  # vocab block of one grad program in the split grid (capped by MAX_BLOCK_V)
GRAD_SPLIT_V = True
BLOCK_T = 1024


def _block_v(vocab: int) -> int:
    return max(16, min(MAX_BLOCK_V, triton.next_power_of_2(max(1, vocab))))


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


@triton.jit
def _stats_kernel(logits_ptr, stride_row, targets_ptr, m_ptr, d_ptr, xt_ptr,
                  V, vocab_start, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    m = float("-inf")
    d = 0.0
    for off in range(0, V, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Masked lanes hold -inf; tl.where keeps them out even if a whole block were masked.
        e = tl.where(mask, tl.exp(x - m_new), 0.0)
        d = d * tl.exp(m - m_new) + tl.sum(e, axis=0)
        m = m_new
    t = tl.load(targets_ptr + row)
    local = t - vocab_start
    inside = (t != ignore_index) & (local >= 0) & (local < V)
    xt = tl.load(base + tl.where(inside, local, 0), mask=inside, other=0.0).to(tl.float32)
    tl.store(m_ptr + row, m)
    tl.store(d_ptr + row, d)
    tl.store(xt_ptr + row, tl.where(inside, xt, 0.0))


@triton.jit
def _finalize_kernel(m_ptr, d_ptr, xt_ptr, targets_ptr, gid_ptr, w_ptr, lse_ptr, loss_ptr,
                     wloss_ptr, T, ignore_index, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < T
    m = tl.load(m_ptr + rows, mask=mask, other=0.0)
    d = tl.load(d_ptr + rows, mask=mask, other=1.0)
    xt = tl.load(xt_ptr + rows, mask=mask, other=0.0)
    t = tl.load(targets_ptr + rows, mask=mask, other=ignore_index)
    g = tl.load(gid_ptr + rows, mask=mask, other=-1)
    lse = m + tl.log(d)
    valid = mask & (t != ignore_index)
    loss = tl.where(valid, lse - xt, 0.0)
    has_w = valid & (g >= 0)
    w = tl.load(w_ptr + tl.where(has_w, g, 0), mask=has_w, other=0.0).to(tl.float32)
    tl.store(lse_ptr + rows, lse, mask=mask)
    tl.store(loss_ptr + rows, loss, mask=mask)
    tl.store(wloss_ptr + rows, tl.where(has_w, w * loss, 0.0), mask=mask)


@triton.jit
def _row_scale(targets_ptr, gid_ptr, w_ptr, g_ptr, stride_g, row, ignore_index):
    """(w_t * g_t, 0 for ignored targets and padding; the target t) of one row."""
    t = tl.load(targets_ptr + row)
    gid = tl.load(gid_ptr + row)
    has_w = (t != ignore_index) & (gid >= 0)
    w = tl.load(w_ptr + tl.where(has_w, gid, 0), mask=has_w, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g).to(tl.float32)
    return tl.where(has_w, w * g, 0.0), t


@triton.jit
def _grad_block(logits_ptr, stride_row, out_ptr, stride_out, row, cols, V, lse, scale, local):
    mask = cols < V
    x = tl.load(logits_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    grad = scale * tl.exp(x - lse) - tl.where(cols == local, scale, 0.0)
    tl.store(out_ptr + row * stride_out + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_kernel(logits_ptr, stride_row, out_ptr, stride_out, lse_ptr, targets_ptr, gid_ptr,
                 w_ptr, g_ptr, stride_g, V, vocab_start, ignore_index, BLOCK_V: tl.constexpr):
    """One program per row, looping over its vocab blocks (GRAD_SPLIT_V = False)."""
    row = tl.program_id(0).to(tl.int64)
    scale, t = _row_scale(targets_ptr, gid_ptr, w_ptr, g_ptr, stride_g, row, ignore_index)
    lse = tl.load(lse_ptr + row)
    for off in range(0, V, BLOCK_V):
        _grad_block(logits_ptr, stride_row, out_ptr, stride_out, row, off + tl.arange(0, BLOCK_V), V, lse,
                    scale, t - vocab_start)


@triton.jit
def _grad_block_kernel(logits_ptr, stride_row, out_ptr, stride_out, lse_ptr, targets_ptr, gid_ptr,
                       w_ptr, g_ptr, stride_g, V, vocab_start, ignore_index, BLOCK_V: tl.constexpr):
    """One program per (row, vocab block)."""
    row = tl.program_id(0).to(tl.int64)
    scale, t = _row_scale(targets_ptr, gid_ptr, w_ptr, g_ptr, stride_g, row, ignore_index)
    lse = tl.load(lse_ptr + row)
    _grad_block(logits_ptr, stride_row, out_ptr, stride_out, row, tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V),
                V, lse, scale, t - vocab_start)


def ce_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, ignore_index: int,
             overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """`overwrite` is accepted for interface parity: the logits stay intact until the backward."""
    T, V = logits.shape
    m, d, xt = (torch.empty(T, dtype=torch.float32, device=logits.device) for _ in range(3))
    if T:
        block = _block_v(V)
        _stats_kernel[(T,)](logits, logits.stride(0), targets, m, d, xt, V, vocab_start,
                            ignore_index, BLOCK_V=block, num_warps=_num_warps(block))
    return m, d, xt, False


def ce_finalize(m: torch.Tensor, d: torch.Tensor, xt: torch.Tensor, targets: torch.Tensor,
                group_ids: torch.Tensor, group_weights: torch.Tensor,
                ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = m.shape[0]
    lse, loss, wloss = (torch.empty_like(m) for _ in range(3))
    if T:
        _finalize_kernel[(triton.cdiv(T, BLOCK_T),)](m, d, xt, targets, group_ids, group_weights,
                                                     lse, loss, wloss, T, ignore_index, BLOCK=BLOCK_T)
    return lse, loss, wloss


def ce_grad(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, group_ids: torch.Tensor,
            group_weights: torch.Tensor, grad_wloss: torch.Tensor, vocab_start: int,
            ignore_index: int, out: torch.Tensor, full_vocab: bool = False,
            local_lse: torch.Tensor | None = None) -> torch.Tensor:
    """`full_vocab` is accepted for interface parity; the kernel always uses the saved lse.
    `local_lse` must be None (these kernels never overwrite the logits in the forward)."""
    if local_lse is not None:
        raise ValueError("the Triton path keeps the logits intact in the forward")
    T, V = logits.shape
    if not T:
        return out
    args = (logits, logits.stride(0), out, out.stride(0), lse, targets, group_ids, group_weights,
            grad_wloss, grad_wloss.stride(0), V, vocab_start, ignore_index)
    if GRAD_SPLIT_V:
        block = min(_block_v(V), GRAD_BLOCK_V, MAX_BLOCK_V)
        _grad_block_kernel[(T, triton.cdiv(V, block))](*args, BLOCK_V=block, num_warps=_num_warps(block))
    else:
        block = _block_v(V)
        _grad_kernel[(T,)](*args, BLOCK_V=block, num_warps=_num_warps(block))
    return out

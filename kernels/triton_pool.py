"""Triton kernels for position-weighted group pooling and the fused score/weight epilogue."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

POOL_BLOCK_T = 32
POOL_BLOCK_H = 128
SCORE_BLOCK_G = 16
SCORE_BLOCK_H = 128


@triton.jit
def _group_pool_kernel(h_ptr, stride_h, gid_ptr, pos_ptr, out_ptr, T, H,
                       BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < T
    cmask = cols < H
    gid = tl.load(gid_ptr + rows, mask=rmask, other=-1)
    pos = tl.load(pos_ptr + rows, mask=rmask, other=0).to(tl.float32)
    valid = rmask & (gid >= 0)
    m2 = valid[:, None] & cmask[None, :]
    h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    dst = out_ptr + tl.where(valid, gid, 0)[:, None] * H + cols[None, :]
    # fp32 atomics: group ids need not be sorted or contiguous; summation order may vary.
    tl.atomic_add(dst, h * pos[:, None], mask=m2)


@triton.jit
def _score_weight_kernel(p_ptr, stride_p, c_ptr, scores_ptr, weights_ptr, G, H, inv_tau, mean,
                         std, w_min, w_max, BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)).to(tl.int64)
    rmask = rows < G
    sq = tl.zeros([BLOCK_G], dtype=tl.float32)
    dot = tl.zeros([BLOCK_G], dtype=tl.float32)
    for off in range(0, H, BLOCK_H):
        cols = off + tl.arange(0, BLOCK_H)
        cmask = cols < H
        x = tl.load(p_ptr + rows[:, None] * stride_p + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        c = tl.load(c_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
        dot += tl.sum(x * c[None, :], axis=1)
    norm = tl.sqrt(sq)
    score = tl.where(norm > 0, dot / tl.where(norm > 0, norm, 1.0), 0.0)
    z = (score - mean) / std * inv_tau
    e = tl.exp(-tl.abs(z))  # overflow-free sigmoid (tau -> 0 sends |z| to infinity)
    w = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    w = tl.minimum(tl.maximum(w, w_min), w_max)
    tl.store(scores_ptr + rows, score, mask=rmask)
    tl.store(weights_ptr + rows, w, mask=rmask)


def group_pool(hidden: torch.Tensor, group_ids: torch.Tensor, positions: torch.Tensor,
               num_groups: int) -> torch.Tensor:
    T, H = hidden.shape
    out = torch.zeros(num_groups, H, dtype=torch.float32, device=hidden.device)
    if T and num_groups:
        grid = (triton.cdiv(T, POOL_BLOCK_T), triton.cdiv(H, POOL_BLOCK_H))
        _group_pool_kernel[grid](hidden, hidden.stride(0), group_ids, positions, out, T, H,
                                 BLOCK_T=POOL_BLOCK_T, BLOCK_H=POOL_BLOCK_H)
    return out


def score_and_weight(pooled: torch.Tensor, centroid: torch.Tensor, tau: float, w_min: float,
                     w_max: float, mean: float = 0.0,
                     std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    G, H = pooled.shape
    scores = torch.empty(G, dtype=torch.float32, device=pooled.device)
    weights = torch.empty_like(scores)
    if G:
        _score_weight_kernel[(triton.cdiv(G, SCORE_BLOCK_G),)](
            pooled, pooled.stride(0), centroid, scores, weights, G, H,
            1.0 / max(float(tau), 1e-8), float(mean), float(std), float(w_min), float(w_max),
            BLOCK_G=SCORE_BLOCK_G, BLOCK_H=SCORE_BLOCK_H)
    return scores, weights

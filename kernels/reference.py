"""Pure-torch implementations of the kernels: the production CPU path and the tests' reference.

They mirror the Triton kernels phase by phase (row statistics, finalize, gradient) so the same
autograd Function drives both. With `overwrite` (in-place backward allowed) and fp32 logits, the
forward turns the logits buffer into its own log-softmax with one fused whole-tensor op (as
megatron's vocab-parallel CE turns it into the softmax) and the backward turns that into the
gradient in place: no [T, V] temporary at all, and few, large ops (see `ce_stats`). Otherwise the
logits stay intact: the forward works on row chunks with one reused fp32 scratch buffer and keeps
only a per-row logsumexp; the backward writes `w * g * (softmax - onehot)` into the gradient buffer.
"""
from __future__ import annotations

import torch

# Row chunks: at least CHUNK_ELEMS elements (4 MiB fp32, cache-sized) and at most MAX_CHUNKS of
# them. Every chunk op is an OpenMP parallel region; on a busy 2-core machine each region's
# barrier costs milliseconds, so bounding the number of chunks matters more than cache fit.
CHUNK_ELEMS = 1 << 20
MAX_CHUNKS = 8


def _row_chunks(num_rows: int, num_cols: int) -> list[tuple[int, int]]:
    step = max(1, -(-num_rows // MAX_CHUNKS), CHUNK_ELEMS // max(1, num_cols))
    return [(s, min(num_rows, s + step)) for s in range(0, num_rows, step)]


def _chunk_buffer(chunks: list[tuple[int, int]], num_cols: int, device: torch.device) -> torch.Tensor:
    """One fp32 scratch buffer reused by every chunk: a fresh large allocation per chunk would
    be mmap-ed and page-faulted anew each time."""
    rows = max((e - s for s, e in chunks), default=0)
    return torch.empty(rows, num_cols, dtype=torch.float32, device=device)


def _targets_in_shard(targets: torch.Tensor, vocab_start: int, vocab_size: int,
                      ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of rows whose target lives in this shard, local target column clamped to be safe)."""
    local = targets - vocab_start
    inside = (targets != ignore_index) & (local >= 0) & (local < vocab_size)
    return inside, torch.where(inside, local, torch.zeros_like(local))


def token_weights(targets: torch.Tensor, group_ids: torch.Tensor, group_weights: torch.Tensor,
                  ignore_index: int) -> torch.Tensor:
    """w[group_ids[t]] as fp32; 0 for ignored targets and padding (group -1)."""
    has_w = (targets != ignore_index) & (group_ids >= 0)
    w = group_weights.detach().float()[group_ids.clamp(min=0)]
    return torch.where(has_w, w, torch.zeros_like(w))


# ---------------------------------------------------------------- cross-entropy phases
def ce_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, ignore_index: int,
             overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Per-row (max, sum exp(x - max), target logit) of this vocab shard, all fp32 [T], and whether
    the logits buffer now holds `x - max` (its log-softmax; only with `overwrite` and fp32 logits).

    The local logsumexp is returned as the "max" with a sum of 1, which is the same statistic.
    `overwrite`: one in-place `_log_softmax` over the whole tensor (one parallel region: on a
    loaded machine every region's barrier costs milliseconds, so whole-tensor ops beat cache-sized
    chunks), then lse = x[c] - log_softmax[c] at the target column (CE = -log_softmax[target] up to
    one rounding) or, for rows without a target here, column 0. Otherwise lse = max(x) -
    max(log_softmax(x)) per row chunk into a scratch buffer, exact to fp32 rounding
    (max(log_softmax) lies in [-log V, 0]).
    """
    T, V = logits.shape
    inside, local = _targets_in_shard(targets, vocab_start, V, ignore_index)
    xt = logits.gather(1, local[:, None]).squeeze(1).float()
    if overwrite and logits.dtype == torch.float32:
        column = torch.where(inside, local, torch.zeros_like(local))[:, None]
        x_col = logits.gather(1, column).squeeze(1)
        torch._log_softmax(logits, -1, False, out=logits)
        lse = x_col - logits.gather(1, column).squeeze(1)
        return lse, torch.ones_like(lse), torch.where(inside, xt, torch.zeros_like(xt)), True
    lse = torch.empty(T, dtype=torch.float32, device=logits.device)
    chunks = _row_chunks(T, V)
    buf = _chunk_buffer(chunks, V, logits.device)
    upcast = _chunk_buffer(chunks, V, logits.device) if logits.dtype != torch.float32 else None
    for s, e in chunks:
        x = logits[s:e]
        if upcast is not None:
            x = upcast[: e - s].copy_(x)
        top = x.amax(dim=-1)
        lsm = torch._log_softmax(x, -1, False, out=buf[: e - s])
        torch.sub(top, lsm.amax(dim=-1), out=lse[s:e])
    return lse, torch.ones_like(lse), torch.where(inside, xt, torch.zeros_like(xt)), False


def ce_finalize(m: torch.Tensor, d: torch.Tensor, xt: torch.Tensor, targets: torch.Tensor,
                group_ids: torch.Tensor, group_weights: torch.Tensor,
                ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logsumexp, plain CE, weighted CE) per row from the (global) row statistics."""
    lse = m + torch.log(d)
    valid = targets != ignore_index
    loss = torch.where(valid, lse - xt, torch.zeros_like(lse))
    wloss = token_weights(targets, group_ids, group_weights, ignore_index) * loss
    return lse, loss, wloss


def ce_grad(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, group_ids: torch.Tensor,
            group_weights: torch.Tensor, grad_wloss: torch.Tensor, vocab_start: int,
            ignore_index: int, out: torch.Tensor, full_vocab: bool = False,
            local_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Write w_t * g_t * (softmax - onehot) into `out` ([T, V], may alias `logits`).

    `local_lse` given: `logits` holds x - local_lse (`ce_stats` overwrote it) and `out` is the same
    buffer: exp in place, times w * g * exp(local_lse - lse) (1 without vocab sharding), minus the
    one-hot; whole-tensor ops. `full_vocab` (no vocab sharding) otherwise allows a fused softmax.
    """
    T, V = logits.shape
    scale = token_weights(targets, group_ids, group_weights, ignore_index) * grad_wloss.float()
    inside, local = _targets_in_shard(targets, vocab_start, V, ignore_index)
    rows = inside.nonzero().squeeze(1)
    if local_lse is not None:
        if out.data_ptr() != logits.data_ptr():
            raise ValueError("an overwritten logits buffer can only take its gradient in place")
        factor = scale if full_vocab else scale * torch.exp(local_lse - lse)
        out.exp_().mul_(factor[:, None])
        out[rows, local[rows]] -= scale[rows]
        return out
    in_fp32 = out.dtype == torch.float32
    if in_fp32 and full_vocab and out.data_ptr() != logits.data_ptr():
        torch._softmax(logits, -1, False, out=out)  # the whole gradient buffer is needed anyway
        out.mul_(scale[:, None])
        out[rows, local[rows]] -= scale[rows]
        return out
    chunks = _row_chunks(T, V)
    scratch = None if in_fp32 else _chunk_buffer(chunks, V, logits.device)
    for s, e in chunks:
        x, dst = logits[s:e], out[s:e]
        buf = dst if scratch is None else scratch[: e - s]
        if x.dtype == buf.dtype:
            torch.sub(x, lse[s:e, None], out=buf)
        else:  # upcast in place: a mixed-dtype sub would allocate a converted copy per chunk
            buf.copy_(x).sub_(lse[s:e, None])
        buf.exp_()
        buf.mul_(scale[s:e, None])
        chunk_rows = inside[s:e].nonzero().squeeze(1)
        buf[chunk_rows, local[s:e][chunk_rows]] -= scale[s:e][chunk_rows]
        if not in_fp32:
            dst.copy_(buf)
    return out


# ---------------------------------------------------------------- pooling and weights
def group_pool(hidden: torch.Tensor, group_ids: torch.Tensor, positions: torch.Tensor,
               num_groups: int) -> torch.Tensor:
    """sum_t position[t] * h_t per group, fp32 [G, H]; group -1 ignored."""
    out = torch.zeros(num_groups, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    keep = (group_ids >= 0).nonzero().squeeze(1)
    contrib = hidden.detach()[keep].float() * positions[keep].to(torch.float32)[:, None]
    out.index_add_(0, group_ids[keep], contrib)
    return out


def score_and_weight(pooled: torch.Tensor, centroid: torch.Tensor, tau: float, w_min: float,
                     w_max: float, mean: float = 0.0,
                     std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(s = normalize(pooled) . centroid, clamp(sigmoid(((s - mean) / std) / tau), w_min, w_max))."""
    p = pooled.detach().float()
    norm = p.norm(dim=1)
    dot = p @ centroid.detach().float()
    scores = torch.where(norm > 0, dot / torch.where(norm > 0, norm, torch.ones_like(norm)),
                         torch.zeros_like(dot))
    return scores, weights_from_scores(scores, tau, w_min, w_max, mean, std)


def weights_from_scores(scores: torch.Tensor, tau: float, w_min: float, w_max: float,
                        mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """clamp(sigmoid(((s - mean) / std) / tau), w_min, w_max): the weight formula (core/weights.py),
    also used directly on precomputed scores (static signals such as BM25)."""
    z = (scores.float() - mean) / std
    return torch.sigmoid(z / max(float(tau), 1e-8)).clamp(min=w_min, max=w_max)

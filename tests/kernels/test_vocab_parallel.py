"""Vocab-parallel weighted CE in 2 and 3 real gloo processes with uneven vocab shards.

Every worker runs both the torch path (CPU tensors) and the Triton kernels, on its shard, with the
row statistics all-reduced between the kernel phases. With CUDA present the Triton kernels run
compiled on CUDA tensors (all workers share the GPU; gloo all-reduces CUDA tensors), otherwise in
the interpreter (each worker is a fresh process, so it can set TRITON_INTERPRET before triton is
first imported). The parent checks that every rank's losses and the concatenated shard gradients
equal the single-process full-vocab result.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.distributed_helper import run_distributed

from .helpers import FORCE_ENV, make_ce_case, max_err, torch_weighted_ce

SPLITS = {2: [61, 40], 3: [17, 50, 34]}  # V = 101, uneven shards
VARIANTS = [(dtype, backend, inplace) for dtype in (torch.float32, torch.bfloat16)
            for backend in ("torch", "triton") for inplace in (False, True)]


def _shard_run(rank: int, world_size: int, splits: list[int], kind: str):
    import torch.distributed as dist

    from adapt_pretrain.kernels import weighted_cross_entropy

    group = dist.new_group(list(range(world_size)))
    case = make_ce_case(kind, V=sum(splits), seed=11)
    start = sum(splits[:rank])
    results = {}
    for dtype, backend, inplace in VARIANTS:
        shard = case.logits[:, start:start + splits[rank]].to(dtype)
        device = "cpu"
        if backend == "triton":
            if torch.cuda.is_available():
                device = "cuda"  # compiled kernels
            elif os.environ.get("TRITON_INTERPRET") != "1":
                assert "triton" not in sys.modules, "triton was imported before the interpreter was set"
                os.environ["TRITON_INTERPRET"] = "1"  # before the first triton import here
            from adapt_pretrain.kernels import triton_ce

            triton_ce.MAX_BLOCK_V = 16  # several blocks per shard, last one partial
        os.environ[FORCE_ENV] = "1" if backend == "triton" else "0"
        logits = shard.to(device).requires_grad_(True) * 1
        wl, loss = weighted_cross_entropy(logits, case.targets.to(device), case.group_ids.to(device),
                                          case.weights.to(device), ignore_index=case.ignore_index,
                                          inplace_backward=inplace, tp_group=group, vocab_start=start)
        (grad,) = torch.autograd.grad(wl, logits, grad_outputs=case.upstream.to(device))
        assert grad.dtype == dtype and wl.dtype == loss.dtype == torch.float32
        assert grad.device.type == device
        # numpy travels by value: tensors would be shared through file descriptors that die with
        # this process before the parent reads them.
        results[(dtype, backend, inplace)] = tuple(t.detach().float().cpu().numpy().copy() for t in (wl, loss, grad))
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_vocab_parallel_matches_single_process(world_size):
    splits = SPLITS[world_size]
    per_rank = run_distributed(_shard_run, world_size, splits, "mixed")
    case = make_ce_case("mixed", V=sum(splits), seed=11)
    for dtype in (torch.float32, torch.bfloat16):
        _check_dtype(per_rank, case, dtype, world_size)


def _check_dtype(per_rank, case, dtype, world_size):
    x = case.logits.to(dtype)
    truth_w, truth_l, truth_g = torch_weighted_ce(x.double(), case)

    from adapt_pretrain.kernels import reference
    from adapt_pretrain.kernels.cross_entropy import WeightedCrossEntropy

    single = x.clone().requires_grad_(True)
    ref_w, ref_l = WeightedCrossEntropy.apply(single, case.targets, case.group_ids, case.weights,
                                              case.ignore_index, False, None, 0, reference)
    (ref_g,) = torch.autograd.grad(ref_w, single, grad_outputs=case.upstream)
    grad_tol = 1e-6 if dtype == torch.float32 else 2.0**-7 * truth_g.abs().max().item()
    assert max_err(ref_w, truth_w) <= 1e-5 and max_err(ref_g, truth_g) <= grad_tol

    for key in [k for k in per_rank[0] if k[0] == dtype]:
        for rank in range(world_size):
            wl, loss, _ = (torch.from_numpy(a) for a in per_rank[rank][key])
            assert max_err(wl, ref_w) <= 2e-5, (key, rank)
            assert max_err(loss, ref_l) <= 2e-5, (key, rank)
            assert (per_rank[rank][key][0] == per_rank[0][key][0]).all(), "ranks disagree on the loss"
        grad = torch.cat([torch.from_numpy(per_rank[r][key][2]) for r in range(world_size)], dim=1)
        assert grad.shape == x.shape
        assert max_err(grad, ref_g) <= grad_tol, key

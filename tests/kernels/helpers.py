"""Shared pieces of the kernel tests: backend selection, random cases, fp64 ground truth.

Backends: "torch" (the CPU reference path) always; "triton" where this process can run the
Triton kernels: compiled on CUDA, or in the interpreter when TRITON_INTERPRET=1 was set before
triton was imported (test_interpreter_suite starts such a process for the CPU run).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FORCE_ENV = "ADAPT_KERNELS_FORCE_TRITON"
HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if HAS_CUDA else ("cpu" if INTERPRETED else None)
BACKENDS = ["torch"] + (["triton"] if TRITON_DEVICE else [])


def use_backend(backend: str, monkeypatch) -> str:
    """Route the public API to `backend`; return the device its tensors must live on."""
    if backend == "torch":
        monkeypatch.setenv(FORCE_ENV, "0")
        from adapt_pretrain.kernels import reference

        monkeypatch.setattr(reference, "CHUNK_ELEMS", 250)  # several row chunks, one partial
        return "cpu"
    monkeypatch.setenv(FORCE_ENV, "1")
    from adapt_pretrain.kernels import triton_ce, triton_pool

    monkeypatch.setattr(triton_ce, "MAX_BLOCK_V", 32)  # several vocab blocks, one partial
    monkeypatch.setattr(triton_pool, "SCORE_BLOCK_H", 32)
    return TRITON_DEVICE


@dataclass
class CECase:
    logits: torch.Tensor  # fp32 master values (CPU); cast to the tested dtype by the test
    targets: torch.Tensor
    group_ids: torch.Tensor
    weights: torch.Tensor
    upstream: torch.Tensor  # non-uniform upstream gradient of the weighted loss
    ignore_index: int


def make_ce_case(kind: str, T: int = 25, V: int = 100, G: int = 6, seed: int = 0) -> CECase:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, V, generator=gen) * 3.0
    ignore_index = -100
    targets = torch.randint(0, V, (T,), generator=gen)
    group_ids = torch.randint(0, G, (T,), generator=gen)
    if kind == "mixed":  # ignored targets and padding tokens sprinkled in
        targets[::5] = ignore_index
        group_ids[1::7] = -1
    elif kind == "padding":  # tail of padding; one padded token keeps a real target
        group_ids[-8:] = -1
        targets[-7:] = ignore_index
    elif kind == "one_token_groups":
        G = T
        group_ids = torch.randperm(T, generator=gen)
    elif kind == "whole_sequence":
        G = 1
        group_ids = torch.zeros(T, dtype=torch.long)
    elif kind == "custom_ignore":  # a real class id used as ignore_index
        ignore_index = 3
        targets[::4] = 3
    else:
        raise ValueError(kind)
    weights = torch.rand(G, generator=gen) * 3.0 + 0.1
    upstream = torch.randn(T, generator=gen)
    return CECase(logits, targets, group_ids, weights, upstream, ignore_index)


def token_weights_fp64(case: CECase) -> torch.Tensor:
    w = torch.zeros(case.targets.shape[0], dtype=torch.float64)
    for t, (g, y) in enumerate(zip(case.group_ids.tolist(), case.targets.tolist())):
        if g >= 0 and y != case.ignore_index:
            w[t] = float(case.weights[g])
    return w


def torch_weighted_ce(logits: torch.Tensor, case: CECase):
    """(weighted loss, plain loss, grad of sum(upstream * weighted loss)) with plain torch ops,
    computed in logits' own dtype (fp64 for the ground truth)."""
    x = logits.detach().clone().requires_grad_(True)
    ce = F.cross_entropy(x, case.targets.to(x.device), ignore_index=case.ignore_index,
                         reduction="none")
    wl = token_weights_fp64(case).to(device=x.device, dtype=ce.dtype) * ce
    (grad,) = torch.autograd.grad(wl, x, grad_outputs=case.upstream.to(x.device, ce.dtype))
    return wl.detach(), ce.detach(), grad


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()

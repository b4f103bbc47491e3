"""Weighted cross-entropy: three-way check (fp64 truth, torch in the same dtype, kernel) of the
forward and of the backward under non-uniform upstream gradients, plus structural properties."""
from __future__ import annotations

import pytest
import torch

from adapt_pretrain.kernels import weighted_cross_entropy
from adapt_pretrain.kernels._dispatch import use_triton

from .helpers import BACKENDS, FORCE_ENV, HAS_CUDA, INTERPRETED, make_ce_case, max_err, torch_weighted_ce, use_backend

KINDS = ["mixed", "padding", "one_token_groups", "whole_sequence", "custom_ignore"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Slack on top of torch's own error in the same dtype: losses are fp32 outputs for every input
# dtype; gradients come back in the input dtype, so allow one rounding step of that dtype more
# (max-abs errors of two correctly rounded results can differ by that much).
LOSS_RTOL = 1e-5
# fp32: a few ulps (GPU exp is an approximation). bf16: Triton's interpreter truncates fp32 -> bf16
# casts (compiled Triton rounds to nearest even), so interpreted bf16 gradients get a full ulp.
GRAD_ROUNDING = {torch.float32: 2.0**-20,
                 torch.bfloat16: 2.0**-7 if INTERPRETED and not HAS_CUDA else 2.0**-8}


def _run_kernel(case, dtype, device, inplace):
    leaf = case.logits.to(dtype).to(device).requires_grad_(True)
    logits = leaf * 1  # a non-leaf buffer, as produced by an output projection
    wl, loss = weighted_cross_entropy(
        logits, case.targets.to(device), case.group_ids.to(device), case.weights.to(device),
        ignore_index=case.ignore_index, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(wl, logits, grad_outputs=case.upstream.to(device))
    return logits, wl, loss, grad


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_three_way(backend, dtype, kind, inplace, monkeypatch):
    device = use_backend(backend, monkeypatch)
    case = make_ce_case(kind)
    x = case.logits.to(dtype)  # the tested input values, exactly representable in `dtype`
    truth_w, truth_l, truth_g = torch_weighted_ce(x.double(), case)
    same_w, same_l, same_g = torch_weighted_ce(x.to(device), case)
    logits, wl, loss, grad = _run_kernel(case, dtype, device, inplace)

    assert wl.dtype == loss.dtype == torch.float32 and grad.dtype == dtype
    assert wl.requires_grad and not loss.requires_grad
    slack_loss = LOSS_RTOL * max(1.0, truth_l.abs().max().item())
    slack_grad = GRAD_ROUNDING[dtype] * truth_g.abs().max().item() + 1e-7
    assert max_err(wl, truth_w) <= max_err(same_w, truth_w) + slack_loss
    assert max_err(loss, truth_l) <= max_err(same_l, truth_l) + slack_loss
    assert max_err(grad, truth_g) <= max_err(same_g, truth_g) + slack_grad

    ignored = (case.targets == case.ignore_index).to(device)
    no_weight = ignored | (case.group_ids.to(device) < 0)
    assert torch.all(wl[no_weight] == 0) and torch.all(loss[ignored] == 0)
    assert torch.all(grad[no_weight] == 0)
    if inplace:
        assert grad.data_ptr() == logits.data_ptr()
    else:
        assert grad.data_ptr() != logits.data_ptr()
        assert torch.equal(logits.detach().cpu(), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_upstream_and_extreme_logits(backend, monkeypatch):
    """Non-contiguous upstream gradient and logits large enough to overflow a naive exp."""
    device = use_backend(backend, monkeypatch)
    case = make_ce_case("mixed", seed=3)
    case.logits = case.logits * 300.0
    truth_w, _, truth_g = torch_weighted_ce(case.logits.double(), case)
    logits = case.logits.to(device).requires_grad_(True)
    wl, _ = weighted_cross_entropy(logits, case.targets.to(device), case.group_ids.to(device),
                                   case.weights.to(device))
    upstream = torch.zeros(2 * len(case.upstream), device=device)
    upstream[::2] = case.upstream.to(device)
    (grad,) = torch.autograd.grad(wl, logits, grad_outputs=upstream[::2])
    assert torch.isfinite(wl).all() and torch.isfinite(grad).all()
    assert max_err(wl, truth_w) <= 1e-6 * truth_w.abs().max().item() + 1e-4
    assert max_err(grad, truth_g) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_logits_and_row_vectors(backend, monkeypatch):
    device = use_backend(backend, monkeypatch)
    case = make_ce_case("mixed")
    logits = case.logits.to(device).requires_grad_(True)
    weights = case.weights.to(device).requires_grad_(True)
    wl, _ = weighted_cross_entropy(logits, case.targets.to(device), case.group_ids.to(device), weights)
    saved = [t for t in wl.grad_fn.saved_tensors if t is not None]
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr()
    assert all(t.dim() == 1 for t in saved if t is not big[0])
    wl.backward(case.upstream.to(device))
    assert weights.grad is None and logits.grad is not None


def test_dispatch_is_env_and_device_driven(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv(FORCE_ENV, "0")
    assert not use_triton(cpu)
    monkeypatch.setenv(FORCE_ENV, "1")
    assert use_triton(cpu)
    if torch.cuda.is_available():
        monkeypatch.setenv(FORCE_ENV, "0")
        assert use_triton(cpu.cuda())


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        weighted_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long),
                               torch.zeros(2, dtype=torch.long), torch.ones(1))
    with pytest.raises(ValueError):
        weighted_cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long),
                               torch.zeros(2, dtype=torch.long), torch.ones(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_guards_other_uses_of_the_logits(backend, monkeypatch):
    """With in-place backward the logits buffer belongs to the kernel (the CPU fp32 path overwrites
    it already in the forward): another autograd use of those logits must fail, not read garbage."""
    device = use_backend(backend, monkeypatch)
    case = make_ce_case("mixed")
    leaf = case.logits.to(device).requires_grad_(True)
    logits = leaf * 1
    other = (logits * logits).sum()  # saves `logits` for its own backward
    wl, _ = weighted_cross_entropy(logits, case.targets.to(device), case.group_ids.to(device),
                                   case.weights.to(device), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (wl.sum() + other).backward()


def test_cpu_inplace_forward_reuses_the_logits_buffer(monkeypatch):
    """CPU fp32 with in-place backward: no [T, V] buffer besides the logits; the forward leaves
    their log-softmax there and the backward the gradient (checked against fp64 elsewhere)."""
    use_backend("torch", monkeypatch)
    case = make_ce_case("mixed")
    logits = case.logits.clone().requires_grad_(True) * 1
    wl, _ = weighted_cross_entropy(logits, case.targets, case.group_ids, case.weights, inplace_backward=True)
    torch.testing.assert_close(logits.detach(), torch.log_softmax(case.logits, dim=-1), rtol=0, atol=1e-5)
    (grad,) = torch.autograd.grad(wl, logits, grad_outputs=case.upstream)
    assert grad.data_ptr() == logits.data_ptr()

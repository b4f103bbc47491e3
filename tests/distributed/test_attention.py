"""SDPA core attention, activation recomputation and the trunk-only anchor refresh (real gloo
processes at TP 1 and TP 2; worker side in _attention_worker.py).

Tolerances: fp32 on CPU. SDPA's math kernel and megatron's baddbmm/softmax/bmm compute the same
sums in different orders, a few ulps (~1e-7 relative) per op; the checks allow 1e-5 relative to the
largest entry, where a wrong mask, scale, head/group mapping or TP shard gives errors of order 1.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed._attention_worker import run_all
from tests.distributed_helper import run_distributed

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    return float((a.double() - b.double()).abs().max()) / (scale if scale > 0 else 1.0)


@pytest.fixture(scope="module", params=[1, 2], ids=["TP1", "TP2"])
def ranks(request):
    return run_distributed(run_all, request.param)


@pytest.mark.parametrize("heads_groups", [(4, 4), (4, 2)], ids=["MHA", "GQA"])
def test_sdpa_matches_megatron_local_attention(ranks, heads_groups):
    """Forward and backward (non-uniform upstream gradient) on every TP rank's heads."""
    for rank, res in enumerate(ranks):
        core = res["core"][heads_groups]
        for key in ("out", "dq", "dk", "dv"):
            sdpa, local, ref = core["sdpa"][key], core["megatron"][key], core["reference"][key]
            assert sdpa.shape == local.shape == ref.shape, (key, sdpa.shape, ref.shape)
            assert _rel(local, ref) < RTOL, f"rank {rank}: megatron's own {key} vs fp64 (harness check)"
            assert _rel(sdpa, ref) < RTOL, f"rank {rank}: SDPA {key} differs from fp64 attention"
            assert _rel(sdpa, local) < RTOL, f"rank {rank}: SDPA {key} differs from megatron's local attention"


def test_gpt_model_sdpa_equals_local(ranks):
    """Whole GPTModel (RoPE, RMSNorm, SwiGLU, GQA) from the same weights: per-token losses and
    every parameter gradient agree between the SDPA and the local layer spec."""
    for rank, res in enumerate(ranks):
        local, sdpa = res["model"]["local"], res["model"]["sdpa"]
        assert _rel(sdpa["losses"], local["losses"]) < RTOL, f"rank {rank}: per-token losses"
        assert sdpa["grads"].keys() == local["grads"].keys()
        for name, grad in local["grads"].items():
            assert grad.abs().max() > 0, f"rank {rank}: {name} got no gradient (vacuous check)"
            assert _rel(sdpa["grads"][name], grad) < RTOL, f"rank {rank}: gradient of {name}"


def test_recomputation_keeps_hidden_capture_and_gradients(ranks):
    """ADAPT's weights come from the hidden states captured at the output layer's input; with
    selective or full recomputation the loss, group weights and gradients are those without it."""
    for rank, res in enumerate(ranks):
        base = res["adapt"]["none"]
        assert base["weights"].std() > 0.01, "weights nearly uniform: the check would be weak"
        for mode in ("selective", "full"):
            other = res["adapt"][mode]
            assert other["loss"] == pytest.approx(base["loss"], rel=1e-6), f"rank {rank} {mode}: loss"
            torch.testing.assert_close(other["weights"], base["weights"], rtol=1e-6, atol=0)
            for name, grad in base["grads"].items():
                assert _rel(other["grads"][name], grad) < 1e-6, f"rank {rank} {mode}: gradient of {name}"


def test_anchor_refresh_runs_trunk_only(ranks):
    """No output-layer call (no logits) during the refresh, and the centroid equals an
    independent fp64 pooling of the hidden states a full forward feeds the output layer."""
    for rank, res in enumerate(ranks):
        for mode, out in res["adapt"].items():
            assert out["refresh_output_layer_calls"] == 0, f"rank {rank} {mode}: refresh computed logits"
            centroid, truth = out["centroid"], out["independent_centroid"]
            assert truth.norm() > 0.1
            assert float((centroid.double() - truth).abs().max()) < 1e-5, f"rank {rank} {mode}: centroid"

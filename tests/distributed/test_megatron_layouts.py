"""Layout equivalence of the megatron step engine with real gloo processes (DESIGN 2, issue 4).

The single-process run on the global batch is the reference. Every (TP, PP, DP, VP) layout loads
the reference's initial weights (mapped onto its shards) and runs (a) one weighted ADAPT step:
same loss, grad norm, gradients, parameter update and weights; (b) 3 ADAPT steps (anchor refresh at
steps 0 and 2, standardised weights from step 1): same losses, grad norms, weights and centroid,
the centroid bit-identical on every rank; then state_dict() is saved, step 3 run, the state
reloaded and step 3 redone: bit-identical on every rank; the final gradients and parameters (after
step 3) match the reference.

Tolerance: 1e-5 relative (per tensor, relative to its largest entry). Everything is fp32; layouts
differ only in float reduction order (TP all-reduce of partial matmul sums, DP gradient sums,
pipeline vs. sequential micro-batch accumulation), each a few ulps (~1e-7 relative) per op; over
4 layers forward + backward and 3 AdamW steps the differences measured here stay below ~1e-6.
Adam's normalised first update lr * g / (|g| + eps) moves each entry by at most ~lr x its relative
gradient error, so the same bound applies to the one-step update (see optim_cfg for why the tests
use eps=1e-6: the key bias has a zero true gradient, i.e. pure rounding noise). A real bug (wrong normaliser, a missing micro-batch,
a wrong shard, the interleaved batch_p2p_comm bug) gives errors of 1e-2 or more.

With ADAPT off, one step must be bit-identical to plain megatron training in the same layout
(megatron's own finalize_model_grads with an int token count).
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed._layouts import STEPS, decode, encode, max_rel_diff, optim_cfg, run_layouts
from tests.distributed_helper import run_distributed

RTOL = 1e-5
RTOL_MULTI = 1e-4
ULP = 2.0 ** -23  # fp32 machine epsilon (spacing of floats at 1.0)

LAYOUTS_2 = [dict(pp=2), dict(tp=2), dict(pp=2, vp=2), dict()]          # () = DP 2
LAYOUTS_4 = [dict(pp=2), dict(tp=2, pp=2), dict(tp=2, pp=2, sp=True)]   # pp=2 with 4 ranks = DP 2


def _name(layout: dict, world: int) -> str:
    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    text = f"TP{tp}-PP{pp}-DP{world // (tp * pp)}"
    if layout.get("vp"):
        text += f"-VP{layout['vp']}"
    if layout.get("sp"):
        text += "-SP"
    return text


@pytest.fixture(scope="module")
def reference():
    return decode(run_distributed(run_layouts, 1, [dict()], None)[0])[0]


@pytest.fixture(scope="module")
def layouts_2(reference):
    return decode(run_distributed(run_layouts, 2, LAYOUTS_2, encode(reference["init"]))[0])


@pytest.fixture(scope="module")
def layouts_4(reference):
    return decode(run_distributed(run_layouts, 4, LAYOUTS_4, encode(reference["init"]))[0])


def _check_adam_update(a: dict, r: dict, init: dict, name: str) -> None:
    """One AdamW step maps each gradient entry to lr * g / (|g| + eps) (+ decoupled decay), whose
    sensitivity to the gradient is at most 2 |dg| / (max(|g|, |g'|) + eps) per unit of lr: a 1e-7
    absolute rounding difference on an entry of size 1e-6 legitimately moves its update by ~0.1 lr.
    So the update must agree to 1e-5 lr plus exactly that sensitivity to the (separately checked)
    gradient difference, plus the rounding of the stored fp32 parameter (one ulp of 1.0 is 1.2e-4 lr). A wrong shard, learning rate, decay or optimizer state mapping moves
    well-conditioned entries by O(lr) and fails."""
    lr, eps = a["lr"][0], optim_cfg().eps
    worst, where = 0.0, ""
    for key in init:
        upd, upd_ref = a["params"][key] - init[key], r["params"][key] - init[key]
        g, g_ref = a["grads"][key], r["grads"][key]
        allowed = lr * (RTOL + 2 * (g - g_ref).abs() / (torch.maximum(g.abs(), g_ref.abs()) + eps)) \
            + 2 * ULP * init[key].abs()  # the parameter's own fp32 rounding (LayerNorm weights are ~1)
        excess = float(((upd - upd_ref).abs() - allowed).max())
        if excess > worst:
            worst, where = excess, key
    assert worst <= 0, f"{name}: one-step update of {where} exceeds the Adam bound by {worst:.2e}"


def _check_against_reference(res: dict, ref: dict, name: str) -> None:
    init = ref["init"]
    # one weighted step (anchors at step 0, raw-score weights): loss, gradients, parameter update
    a, r = res["one"], ref["one"]
    assert a["lr"][0] > 0, "the one-step update check needs a non-zero learning rate"
    assert a["loss"][0] == pytest.approx(r["loss"][0], rel=RTOL), f"{name}: one-step loss"
    assert a["grad_norm"][0] == pytest.approx(r["grad_norm"][0], rel=RTOL), f"{name}: one-step grad norm"
    rel, key = max_rel_diff(a["grads"], r["grads"])
    assert rel < RTOL, f"{name}: gradient of {key} differs by {rel:.2e} (relative)"
    _check_adam_update(a, r, init, name)
    torch.testing.assert_close(torch.cat(a["weights"]), torch.cat(r["weights"]), rtol=RTOL, atol=1e-6)
    # three steps with standardised weights and refreshes at 0 and 2
    a, r = res["adapt"], ref["adapt"]
    assert a["refresh_steps"] == r["refresh_steps"] == [0, 2], name
    for step in range(STEPS):
        assert a["loss"][step] == pytest.approx(r["loss"][step], rel=RTOL), f"{name} loss at step {step}"
        assert a["grad_norm"][step] == pytest.approx(r["grad_norm"][step], rel=RTOL), f"{name} grad norm {step}"
        assert a["lr"][step] == r["lr"][step]
    # By step 2 the parameters already differ by Adam-amplified rounding (below), so the gradients
    # get 1e-4 relative; a real error (wrong weight, normaliser, shard) is orders of magnitude larger.
    rel, key = max_rel_diff(a["grads"], r["grads"])
    assert rel < RTOL_MULTI, f"{name}: step-{STEPS - 1} gradient of {key} differs by {rel:.2e} (relative)"
    # Parameters after 3 steps: within 1e-3 of one step's size (lr) plus their own fp32 rounding per
    # step. An entry whose gradient passes near 0 at some step has its rounding difference amplified
    # by Adam's normalisation (measured up to 2e-4 lr here); a wrong update moves entries by O(lr).
    # Adam is invariant to a global gradient scale, so a wrong normaliser would not show up here;
    # the loss, grad-norm and gradient checks catch it.
    lr = a["lr"][0]
    assert lr > 0
    for key in r["params"]:
        allowed = 1e-3 * lr + 2 * STEPS * ULP * r["params"][key].abs()
        excess = float(((a["params"][key] - r["params"][key]).abs() - allowed).max())
        assert excess <= 0, f"{name}: parameter {key} after {STEPS} steps exceeds the bound by {excess:.2e}"
    assert a["resume_exact"], f"{name}: reloading state_dict() and redoing a step is not exact"
    assert a["centroid_identical_all"], f"{name}: centroid differs between ranks"
    torch.testing.assert_close(a["centroid"], r["centroid"], rtol=RTOL, atol=1e-7)
    # the global batch's per-group rows were gathered over DP on the last stage
    torch.testing.assert_close(torch.cat(a["weights"]), torch.cat(r["weights"]), rtol=RTOL, atol=1e-6)


def test_reference_is_not_trivial(reference):
    """Guard against a vacuous comparison: weights really vary and the loss moves."""
    a = reference["adapt"]
    assert a["refresh_steps"] == [0, 2]
    for weights in (a["weights"][1], reference["one"]["weights"][0]):
        assert weights.std() > 0.05, f"ADAPT weights nearly uniform (std {weights.std():.3g}); the test would be weak"
    assert torch.all(a["weights"][0] == 1.0), "step 0 is uniform under standardize (no statistics yet)"
    assert reference["off_equals_plain"], f"ADAPT off != plain megatron (max diff {reference['off_max_diff']:.3g})"
    assert reference["off_loss"] == reference["plain_loss"]


@pytest.mark.parametrize("index", range(len(LAYOUTS_2)), ids=[_name(x, 2) for x in LAYOUTS_2])
def test_layout_world2(layouts_2, reference, index):
    res = layouts_2[index]
    name = _name(res["layout"], 2)
    _check_against_reference(res, reference, name)
    assert res["off_equals_plain"], f"{name}: ADAPT off != plain (max diff {res['off_max_diff']:.3g})"
    assert res["off_loss"] == res["plain_loss"], name


@pytest.mark.parametrize("index", range(len(LAYOUTS_4)), ids=[_name(x, 4) for x in LAYOUTS_4])
def test_layout_world4(layouts_4, reference, index):
    res = layouts_4[index]
    name = _name(res["layout"], 4)
    _check_against_reference(res, reference, name)
    assert res["off_equals_plain"], f"{name}: ADAPT off != plain (max diff {res['off_max_diff']:.3g})"
    assert res["off_loss"] == res["plain_loss"], name


def test_nonfinite_loss_skips_update(reference):
    skip = reference["skip"]
    assert skip["skipped"] and not skip["loss_finite"]
    assert skip["unchanged"], "a skipped step changed parameters"
    assert skip["scheduler_steps"] == 1, "only the clean step advances the LR schedule"
    assert not skip["clean_skipped"] and skip["clean_loss_finite"]

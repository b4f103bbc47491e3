"""Layout equivalence of the megatron step engine with real gloo processes (docs/PARALLELISM.md).

Every (TP, PP, DP, VP) layout loads the single-process run's initial weights (mapped onto its shards)
and makes the runs of `_layouts.runs()`: one weighted ADAPT step (`weights`), the same under
`tokens`, LinUpper (uniform, then weighted), and 3 standardised ADAPT steps (anchor refresh at steps
0 and 2) followed by a state_dict round trip (bit-identical on every rank).

Two references. (1) The single-process run of the same engine: same loss, grad norm, gradients,
parameter update, weights and centroid. (2) An independent fp64 reference (`reference.py`: the GPT
and the method written out in plain torch, no code shared with the engine, core or kernels) replays
every run on the layout's own parameters before each step: a bug every layout shares, which (1)
cannot see, fails here.

Tolerance: 1e-5 relative (per tensor, relative to its largest entry). Everything is fp32; layouts
differ only in float reduction order (TP all-reduce of partial matmul sums, DP gradient sums,
pipeline vs. sequential micro-batch accumulation), each a few ulps (~1e-7 relative) per op; over
4 layers forward + backward and 3 AdamW steps the differences measured here stay below ~1e-6.
Adam's normalised first update lr * g / (|g| + eps) moves each entry by at most ~lr x its relative
gradient error, so the same bound applies to the one-step update (see optim_cfg for why the tests
use eps=1e-6: the key bias has a zero true gradient, i.e. pure rounding noise). A real bug (wrong
normaliser, a missing micro-batch, a wrong shard, the interleaved batch_p2p_comm bug) gives errors
of 1e-2 or more.

With ADAPT off, one step must be bit-identical to plain megatron training in the same layout
(megatron's own finalize_model_grads with an int token count).
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed._layouts import (DOMAINS, HEADS, STEPS, anchor_batches, decode, encode, global_batches,
                                        max_rel_diff, optim_cfg, run_layouts, runs)
from tests.distributed.reference import Method, Reference, StepReference
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


def _assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """max |actual - expected| <= tol * max |expected| (rounding is relative to a vector's scale)."""
    diff, scale = float((actual.double() - expected.double()).abs().max()), float(expected.abs().max())
    assert diff <= tol * scale, f"{what}: differs by {diff:.2e} (scale {scale:.2e}, allowed {tol * scale:.2e})"


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
    # the step-0 centroid comes from identical weights: only reduction order differs
    _assert_close_to_scale(a["centroid"], r["centroid"], RTOL, f"{name}: step-0 centroid")
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
    # The step-2 centroid is encoded with parameters that have taken two AdamW steps, which agree only
    # to the multi-step bound above (their step-2 gradients to RTOL_MULTI), not to RTOL. Parameter
    # differences perturb the hidden states, hence every entry of the mean unit embedding, by a fraction
    # of the centroid's scale, not of the entry: a 2e-3 entry moved by 1.3e-7 in TP 2 (6e-5 of itself,
    # 5e-7 of the largest entry, 0.25). So the check is scale-aware at the step-2 gradient tolerance. The
    # centroid is checked to RTOL against the independent reference on each layout's own parameters.
    _assert_close_to_scale(a["centroid"], r["centroid"], RTOL_MULTI, f"{name}: step-2 centroid")
    # the global batch's per-group rows were gathered over DP on the last stage
    torch.testing.assert_close(torch.cat(a["weights"]), torch.cat(r["weights"]), rtol=RTOL, atol=1e-6)


def _recorded(run: dict, init: dict, steps: int, with_resume: bool) -> list[dict]:
    """Per step of a run: the parameters it started from, its batches, loss, grad norm, gradients and
    (where gathered) group weights. The adapt run's resume check adds step `steps`."""
    params = [init] + run["step_params"]
    grads, losses, norms = list(run["step_grads"]), list(run["loss"]), list(run["grad_norm"])
    if with_resume:
        grads.append(run["grads"])
        losses.append(run["resume_loss"])
        norms.append(run["resume_grad_norm"])
    weights = list(run["weights"]) + [None] * (len(losses) - len(run["weights"]))
    return [dict(params=params[k], batches=global_batches(k), loss=losses[k], grad_norm=norms[k], grads=grads[k],
                 weights=weights[k]) for k in range(len(losses))]


def _independent_tolerance(cfg, expected: StepReference) -> float:
    """RTOL; a LinUpper weight additionally amplifies the fp32 rounding of the group mean losses (a few
    ulps of the loss, ~2e-6 at 5) by its slope 2d / (r (max - min)) (~27 here): one more ulp there is a
    relative weight error of ~1e-5, while a gradient leaking through the weights or a rank-local loss
    range changes weights and gradients by 1e-2 or more."""
    if expected.loss_range is None:
        return RTOL
    lo, hi = expected.loss_range
    slope = 2 * cfg.linupper_d / (cfg.linupper_r * (hi - lo))
    return RTOL + slope * 4 * ULP * max(abs(lo), abs(hi))


def _check_against_independent(res: dict, init: dict, name: str) -> None:
    """Every run of `res` replayed by the independent fp64 reference on the layout's own parameters
    before each step: loss, grad norm, gradients (clipped as the optimizer sees them), group weights and
    centroid. Same parameters, so the tolerance is one forward/backward's fp32 rounding, as in the
    one-step checks above."""
    for run_name, (cfg, steps) in runs().items():
        run = res[run_name]
        recorded = _recorded(run, init, steps, with_resume=run_name == "adapt")
        reference = Reference(Method(cfg), HEADS, optim_cfg().clip_grad)
        params, batches = [r["params"] for r in recorded], [r["batches"] for r in recorded]
        if cfg.policy == "linupper":
            expected = reference.linupper_run(params, batches)
        else:
            expected = reference.adapt_run(params, batches, anchor_batches())
        for step, (got, want) in enumerate(zip(recorded, expected)):
            tol = _independent_tolerance(cfg, want)
            where = f"{name} {run_name} step {step} vs the independent reference"
            assert got["loss"] == pytest.approx(want.loss, rel=tol), f"{where}: loss"
            assert got["grad_norm"] == pytest.approx(want.grad_norm, rel=tol), f"{where}: grad norm"
            rel, key = max_rel_diff(got["grads"], want.grads)
            assert rel < tol, f"{where}: gradient of {key} differs by {rel:.2e} (relative)"
            if got["weights"] is not None:
                _assert_close_to_scale(got["weights"], want.weights, tol, f"{where}: group weights")
        if expected[-1].centroid is not None:
            _assert_close_to_scale(run["centroid"], expected[-1].centroid, RTOL, f"{name} {run_name}: centroid")


def _plain_metrics(rows: dict, names: list[str]) -> dict[str, float]:
    """The monitoring metrics of gathered group rows in plain fp64 torch (docs/MONITORING.md
    definitions; no code shared with adapt_pretrain.monitor)."""
    w, s = rows["weights"].double(), rows["scores"].double()
    t, loss, d = rows["group_tokens"].double(), rows["group_loss_sum"].double(), rows["group_domain"]
    wt = w * t
    out = {"adapt/groups": float(w.numel()), "adapt/tokens": float(t.sum()), "adapt/weight_mean": float(w.mean()),
           "adapt/weight_std": float(w.std(unbiased=False)), "adapt/weight_min": float(w.min()),
           "adapt/weight_max": float(w.max()), "adapt/ess": float(w.sum() ** 2 / (w * w).sum()),
           "adapt/ess_frac": float(w.sum() ** 2 / (w * w).sum() / w.numel()),
           "adapt/effective_data_ratio": float(wt.sum() / t.sum()), "adapt/score_mean": float(s.mean()),
           "adapt/score_min": float(s.min()), "adapt/score_max": float(s.max()),
           "loss/mean": float(loss.sum() / t.sum()), "loss/weighted": float((w * loss).sum() / wt.sum())}
    for i, name in enumerate(names):
        sel = d == i
        out[f"domain/{name}/token_share"] = float(t[sel].sum() / t.sum())
        out[f"domain/{name}/weighted_share"] = float(wt[sel].sum() / wt.sum())
        out[f"domain/{name}/mean_weight"] = float(wt[sel].sum() / t[sel].sum())
    return out


def _check_step_metrics(res: dict, name: str, last_stage_ranks: int) -> None:
    """The metrics every step returns (partial sums of each rank's own groups, reduced over DP) equal
    a plain-torch computation over the whole global batch (the rows gathered over DP, whose weights
    the other checks compare with the references), on every last-stage rank; the group count equals
    the global batch's, counted from the batches themselves."""
    for run_name, (_, steps) in runs().items():
        run = res[run_name]
        assert run["metrics_ranks"] == last_stage_ranks, f"{name} {run_name}: step metrics on the wrong ranks"
        assert len(run["metrics"]) == len(run["groups"]) == steps, f"{name} {run_name}: metrics of every step"
        for step, (metrics, rows) in enumerate(zip(run["metrics"], run["groups"])):
            got, where = metrics["scalars"], f"{name} {run_name} step {step}"
            assert got["adapt/groups"] == sum(mb["num_groups"] for mb in global_batches(step)), f"{where}: groups"
            for key, value in _plain_metrics(rows, list(DOMAINS)).items():
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), f"{where}: {key}"
            counts, _ = metrics["histograms"]["hist/weights"]
            assert sum(counts) == got["adapt/groups"], f"{where}: weight histogram counts"
        assert run["metrics_identical_all"], f"{name} {run_name}: step metrics differ between last-stage ranks"


def test_single_process_matches_independent_reference(reference):
    _check_against_independent(reference, reference["init"], "TP1-PP1-DP1")
    _check_step_metrics(reference, "TP1-PP1-DP1", last_stage_ranks=1)


def test_reference_is_not_trivial(reference):
    """Guard against a vacuous comparison: weights really vary and the loss moves."""
    a = reference["adapt"]
    assert a["refresh_steps"] == [0, 2]
    for weights in (a["weights"][1], reference["one"]["weights"][0]):
        assert weights.std() > 0.05, f"ADAPT weights nearly uniform (std {weights.std():.3g}); the test would be weak"
    assert torch.all(a["weights"][0] == 1.0), "step 0 is uniform under standardize (no statistics yet)"
    assert reference["tokens"]["weights"][0].std() > 0.05, "tokens-mode weights nearly uniform"
    linupper = reference["linupper"]["weights"]
    assert torch.all(linupper[0] == 1.0) and linupper[1].std() > 0.05, "LinUpper: uniform, then spread weights"
    assert reference["off_equals_plain"], f"ADAPT off != plain megatron (max diff {reference['off_max_diff']:.3g})"
    assert reference["off_loss"] == reference["plain_loss"]


@pytest.mark.parametrize("index", range(len(LAYOUTS_2)), ids=[_name(x, 2) for x in LAYOUTS_2])
def test_layout_world2(layouts_2, reference, index):
    res = layouts_2[index]
    name = _name(res["layout"], 2)
    _check_against_reference(res, reference, name)
    _check_against_independent(res, reference["init"], name)
    _check_step_metrics(res, name, last_stage_ranks=2 // res["layout"].get("pp", 1))
    assert res["off_equals_plain"], f"{name}: ADAPT off != plain (max diff {res['off_max_diff']:.3g})"
    assert res["off_loss"] == res["plain_loss"], name


@pytest.mark.parametrize("index", range(len(LAYOUTS_4)), ids=[_name(x, 4) for x in LAYOUTS_4])
def test_layout_world4(layouts_4, reference, index):
    res = layouts_4[index]
    name = _name(res["layout"], 4)
    _check_against_reference(res, reference, name)
    _check_against_independent(res, reference["init"], name)
    _check_step_metrics(res, name, last_stage_ranks=4 // res["layout"].get("pp", 1))
    assert res["off_equals_plain"], f"{name}: ADAPT off != plain (max diff {res['off_max_diff']:.3g})"
    assert res["off_loss"] == res["plain_loss"], name


def test_nonfinite_loss_skips_update(reference):
    skip = reference["skip"]
    assert skip["skipped"] and not skip["loss_finite"]
    assert skip["unchanged"], "a skipped step changed parameters"
    assert skip["scheduler_steps"] == 1, "only the clean step advances the LR schedule"
    assert not skip["clean_skipped"] and skip["clean_loss_finite"]

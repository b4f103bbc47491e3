"""Resume into a different (TP, PP, DP) layout through sharded checkpoints, real gloo processes.

For each A -> B (the last one with the Llama-style model: grouped-query QKV and SwiGLU saved under
TP 2, loaded under PP 2 x DP 2): 2 ADAPT steps under layout A, a sharded checkpoint (model, Adam, scheduler,
ADAPT engine), a resume under layout B and 2 more steps must equal 4 uninterrupted steps under B:
losses, parameters and both Adam moments (gathered to full tensors by the layout tests' own
parameter mapping, not by dist_checkpointing), at the resume point and at the end. Step 2 refreshes
the anchors and re-estimates the standardisation statistics from the unit embeddings carried over.

Tolerance: the layout tests' multi-step bound (1e-4 relative to each tensor's largest entry; layouts
differ only in float reduction order). Without the optimiser state the moments are off by O(1)
(checked below), so the bound separates a correct load from a missing or misplaced one.
"""
from __future__ import annotations

import math

import pytest
from torch.distributed.checkpoint import FileSystemReader

from tests.checkpointing._reshard_workers import run_jobs
from tests.distributed._layouts import decode, encode, max_rel_diff
from tests.distributed_helper import run_distributed

RTOL = 1e-4  # the layout tests' RTOL_MULTI
ULP = 2.0 ** -23
LR = 1e-3  # optim_cfg().lr; the schedule stays within a factor 2 of it over these steps

A_PP2, A_DP2, A_TP2 = dict(pp=2), dict(), dict(tp=2)            # on 2 ranks
B_TP2, B_SINGLE, B_TP1_PP2_DP2 = dict(tp=2), dict(), dict(pp=2)  # on 2, 1 and 4 ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every job of the three cases, in 3 process groups (2, 1 and 4 ranks)."""
    root = tmp_path_factory.mktemp("reshard")
    dirs = {name: str(root / name) for name in ("pp2", "dp2", "tp2", "async")}
    first = decode(run_distributed(run_jobs, 2, [
        dict(kind="train_save", layout=A_DP2, directory=dirs["dp2"]),   # also makes the initial weights
        dict(kind="train_save", layout=A_PP2, directory=dirs["pp2"]),
        dict(kind="train_save", layout=A_TP2, directory=dirs["tp2"], model="llama"),
        dict(kind="reference", layout=B_TP2),
        dict(kind="resume", layout=B_TP2, directory=dirs["pp2"]),
        dict(kind="async_save", layout=A_DP2, directory=dirs["async"], model="llama"),
    ], None, timeout=600)[0])
    init = encode({"gpt": first[0]["init"], "llama": first[2]["init"]})
    single = decode(run_distributed(run_jobs, 1, [
        dict(kind="reference", layout=B_SINGLE),
        dict(kind="resume", layout=B_SINGLE, directory=dirs["dp2"]),
        dict(kind="resume", layout=B_SINGLE, directory=dirs["dp2"], load_optimizer=False),
    ], init, timeout=600)[0])
    four = decode(run_distributed(run_jobs, 4, [
        dict(kind="reference", layout=B_TP1_PP2_DP2, model="llama"),
        dict(kind="resume", layout=B_TP1_PP2_DP2, directory=dirs["tp2"], model="llama"),
    ], init, timeout=600)[0])
    return {"A": {"dp2": first[0], "pp2": first[1], "tp2": first[2]},
            "TP1-PP2-DP1 -> TP2-PP1-DP1": (first[3], first[4], first[1]),
            "TP1-PP1-DP2 -> TP1-PP1-DP1": (single[0], single[1], first[0]),
            "TP2-PP1-DP1 -> TP1-PP2-DP2": (four[0], four[1], first[2]),
            "no_optimizer": single[2], "async": first[5]}


def _param_excess(resumed: dict, reference: dict, lr: float, steps: int) -> tuple[float, str]:
    """The layout tests' parameter bound: within 1e-3 of one step's size (lr) plus 2 ulps of the
    parameter per step; returns the worst excess over it (<= 0 passes) and its tensor."""
    worst, where = -math.inf, ""
    for key, want in reference["params"].items():
        allowed = 1e-3 * lr + 2 * steps * ULP * want.abs()
        excess = float(((resumed["params"][key] - want).abs() - allowed).max())
        if excess > worst:
            worst, where = excess, key
    return worst, where


def _compare(resumed: dict, reference: dict) -> dict[str, float]:
    """Worst relative difference per Adam moment, and of the parameters (for the report)."""
    return {"params": max_rel_diff(resumed["params"], reference["params"])[0],
            "exp_avg": max_rel_diff(resumed["adam"]["exp_avg"], reference["adam"]["exp_avg"])[0],
            "exp_avg_sq": max_rel_diff(resumed["adam"]["exp_avg_sq"], reference["adam"]["exp_avg_sq"])[0]}


CASES = ["TP1-PP2-DP1 -> TP2-PP1-DP1", "TP1-PP1-DP2 -> TP1-PP1-DP1", "TP2-PP1-DP1 -> TP1-PP2-DP2"]


@pytest.mark.parametrize("case", CASES)
def test_resume_in_another_layout_equals_uninterrupted(runs, case):
    reference, resumed, saved = runs[case]
    # the first two steps under A match B's (same batches, layouts differ only in rounding)
    assert all(math.isclose(a, b, rel_tol=RTOL) for a, b in zip(saved["loss"], reference["loss"][:2])), \
        (saved["loss"], reference["loss"])
    at_save = _compare(resumed["at_save"], reference["at_save"])
    assert max(at_save["exp_avg"], at_save["exp_avg_sq"]) < RTOL, f"{case}: Adam moments after loading {at_save}"
    excess, key = _param_excess(resumed["at_save"], reference["at_save"], LR, 2)
    assert excess <= 0, f"{case}: parameter {key} after loading exceeds the bound by {excess:.2e}"
    assert resumed["at_save"]["adam"]["steps"] == [2.0], resumed["at_save"]["adam"]["steps"]
    assert resumed["at_save"]["scheduler_steps"] == reference["at_save"]["scheduler_steps"] == 2
    assert math.isclose(resumed["at_save"]["lr"], reference["at_save"]["lr"], rel_tol=1e-12)
    for got, want in zip(resumed["loss"], reference["loss"][2:]):
        assert math.isclose(got, want, rel_tol=RTOL), (case, resumed["loss"], reference["loss"][2:])
    end = _compare(resumed["end"], reference["end"])
    assert max(end["exp_avg"], end["exp_avg_sq"]) < RTOL, f"{case}: Adam moments after 2 more steps {end}"
    excess, key = _param_excess(resumed["end"], reference["end"], LR, 4)
    assert excess <= 0, f"{case}: parameter {key} after 4 steps exceeds the bound by {excess:.2e}"
    assert resumed["end"]["adam"]["steps"] == [4.0]


def test_the_bound_detects_a_missing_optimizer_state(runs):
    """Control: the same resume without the optimiser state is far outside the tolerance."""
    reference, _, _ = runs["TP1-PP1-DP2 -> TP1-PP1-DP1"]
    blind = runs["no_optimizer"]
    diff = _compare(blind["end"], reference["end"])
    assert diff["exp_avg"] > 100 * RTOL and diff["exp_avg_sq"] > 100 * RTOL, diff
    assert _param_excess(blind["end"], reference["end"], LR, 4)[0] > 0


# ----- the sharded save itself (DP 2, the first process group's async_save job) -------------------
# An asynchronous save completes only at finalize (the commit callback runs then) and loads back
# exactly; the fully parallel save splits the writing between the two ranks, each tensor once.

def test_async_save_completes_at_finalize_and_loads_exactly(runs):
    assert runs["async"]["pending"] == 1 and not runs["async"]["complete_before"]
    assert runs["async"]["complete_after"] and runs["async"]["done"] == [True]
    assert runs["async"]["exact"]


def test_fully_parallel_save_writes_each_tensor_once_split_over_ranks(runs):
    files = runs["async"]["files"]
    shards = {name: size for name, size in files.items() if name.endswith(".distcp")}
    per_rank = {name.split("_")[2]: size for name, size in shards.items()}  # __RANK_THREAD.distcp
    assert sorted(per_rank) == ["0", "1"] and min(per_rank.values()) > 0, shards
    # every tensor (parameters, exp_avg, exp_avg_sq) is stored once: its stored chunks tile it exactly
    # (torch's own reader of the metadata, not megatron's)
    metadata = FileSystemReader(runs["async"]["directory"]).read_metadata()
    stored: dict[str, int] = {}
    for index in metadata.storage_data:
        chunk = metadata.state_dict_metadata[index.fqn]
        if hasattr(chunk, "chunks"):
            sizes = [c.sizes for c in chunk.chunks if tuple(c.offsets) == tuple(index.offset)]
            assert len(sizes) == 1, index
            stored[index.fqn] = stored.get(index.fqn, 0) + math.prod(sizes[0])
    tensors = {k: math.prod(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "chunks")}
    assert stored == tensors
    assert sum(tensors.values()) * 4 == 3 * runs["async"]["param_bytes"]  # parameters + two moments, fp32
    # file bytes: those tensors once plus per-tensor headers (1.4x at this tiny size); one copy per
    # data-parallel replica would be 2x or more
    assert sum(shards.values()) < 1.6 * 3 * runs["async"]["param_bytes"]

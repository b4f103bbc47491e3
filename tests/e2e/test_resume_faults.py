"""Faults injected into the checkpoints of a real run, then real `--resume` processes (one rank each).

One base run (4 steps, a checkpoint after every step) is copied for each case, damaged on disk the way
users and machines damage it, and resumed. Each case shows: progress kept (the newest checkpoint that
verifies is used, and the re-run steps equal the original ones bit for bit), nothing overwritten or
deleted (damaged and newer checkpoints are moved aside with their bytes intact), a message that
names the checkpoint and the reason, and the exit code. Extending `train.steps` on resume is here
too, since it starts from the same base run.
"""
from __future__ import annotations

import math
import os
import shutil

import pytest

from .conftest import TINY_MODEL
from .helpers import events, flip_byte, losses, snapshot, train_plain, truncate

LR, MIN_LR, WARMUP = 1e-3, 1e-4, 1


def args(data_dir: str, run_dir: str, *extra: str) -> list[str]:
    return [*TINY_MODEL, f"data.data_dir={data_dir}", "data.num_workers=0", f"train.run_dir={run_dir}",
            "train.steps=4", "train.micro_batch_size=2", "train.progress_bar=false", "train.checkpoint_interval=1",
            "train.keep_checkpoints=5", f"optim.lr={LR}", f"optim.min_lr={MIN_LR}", f"optim.warmup_steps={WARMUP}",
            "adapt.enabled=true", "adapt.num_anchors=8", "adapt.refresh_interval=2", "wandb.enabled=false", *extra]


@pytest.fixture(scope="module")
def base(demo_data_dir, tmp_path_factory) -> str:
    run_dir = str(tmp_path_factory.mktemp("faults") / "base")
    train_plain(args(demo_data_dir, run_dir))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == \
        ["latest", "step_000001", "step_000002", "step_000003", "step_000004"]
    return run_dir


def copy_of(base: str, tmp_path) -> tuple[str, str]:
    run_dir = str(tmp_path / "run")
    shutil.copytree(base, run_dir)
    return run_dir, os.path.join(run_dir, "checkpoints")


def superseded(ckpt: str) -> str:
    (name,) = [n for n in os.listdir(ckpt) if n.startswith("superseded_")]
    return os.path.join(ckpt, name)


def model_shard(step_dir: str) -> str:
    """A data file of the sharded model checkpoint (relative to the step folder), owned by rank 0."""
    names = sorted(n for n in os.listdir(os.path.join(step_dir, "model")) if n.endswith(".distcp"))
    assert names, os.listdir(os.path.join(step_dir, "model"))
    return f"model/{names[0]}"


ENGINE = "run/engine.pt"  # the ADAPT engine state (rank 0 writes it)


def test_damaged_checkpoints_and_stale_latest_fall_back(base, demo_data_dir, tmp_path):
    """Flipped bytes in the newest model shard, a truncated meta.json in the next, a truncated engine file in the
    one before, and `latest` naming a deleted folder: the resume falls back to step 1, names each reason,
    moves the damaged ones aside untouched, and re-runs steps 1-3 exactly as before."""
    run_dir, ckpt = copy_of(base, tmp_path)
    shard = model_shard(os.path.join(ckpt, "step_000004"))
    flip_byte(os.path.join(ckpt, "step_000004", shard))
    truncate(os.path.join(ckpt, "step_000003", "meta.json"))
    truncate(os.path.join(ckpt, "step_000002", ENGINE))
    with open(os.path.join(ckpt, "latest"), "w") as fh:
        fh.write("step_000009")
    damaged = {k: v for k, v in snapshot(ckpt).items() if not k.startswith(("step_000001", "latest"))}
    proc = train_plain([*args(demo_data_dir, run_dir), "--resume"])
    log = proc.stdout + proc.stderr
    assert "checkpoints/latest names step_000009, which does not exist" in log
    assert f"step_000004: {shard} does not match its recorded sha256 checksum (damaged)" in log
    assert "step_000003: meta.json has" in log and f"step_000002: {ENGINE} has" in log and "truncated" in log
    assert "falling back to step_000001" in log and "resumed from" in log and "at step 1" in log
    assert "Traceback" not in log
    assert {k: v for k, v in snapshot(superseded(ckpt)).items() if k != "WHY.txt"} == damaged  # kept, untouched
    old = losses(base)
    assert [losses(run_dir)[s] for s in (1, 2, 3)] == [old[1], old[2], old[3]]  # exact: the good state came back
    assert [e["fields"]["resumed"] for e in events(run_dir, "checkpoint_fallback")] == ["step_000001"]


def test_nothing_loadable_refuses_then_restart_moves_aside(base, demo_data_dir, tmp_path):
    """Every checkpoint damaged: `--resume` refuses (exit 3), naming each and why, changing nothing;
    `--restart-from-scratch` then starts at step 0 and keeps the old checkpoints, byte for byte."""
    run_dir, ckpt = copy_of(base, tmp_path)
    shard = model_shard(os.path.join(ckpt, "step_000004"))
    flip_byte(os.path.join(ckpt, "step_000004", shard))
    truncate(os.path.join(ckpt, "step_000003", "manifest.json"))
    os.remove(os.path.join(ckpt, "step_000002", ENGINE))
    os.remove(os.path.join(ckpt, "step_000001", "manifest.json"))
    before = snapshot(run_dir)
    proc = train_plain([*args(demo_data_dir, run_dir), "--resume"], check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    message = proc.stderr
    assert "no checkpoint in" in message and "can be loaded" in message and "Traceback" not in message
    for line in (f"step_000004: {shard} does not match its recorded sha256", "step_000003: manifest.json is unreadable",
                 f"step_000002: {ENGINE} is missing", "step_000001: manifest.json is missing", "--restart-from-scratch"):
        assert line in message, line
    assert snapshot(run_dir) == before
    old_checkpoints = {k: v for k, v in snapshot(ckpt).items()}
    proc = train_plain([*args(demo_data_dir, run_dir, "train.stop_at_step=1"), "--resume", "--restart-from-scratch"])
    assert "moved to" in proc.stderr and "starting from step 0" in proc.stderr
    assert {k: v for k, v in snapshot(superseded(ckpt)).items() if k != "WHY.txt"} == old_checkpoints
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("step_")) == ["step_000001"]


def test_fresh_start_refuses_to_overwrite(base, demo_data_dir, tmp_path):
    run_dir, ckpt = copy_of(base, tmp_path)
    before = snapshot(run_dir)
    proc = train_plain(args(demo_data_dir, run_dir), check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "already holds checkpoints (newest: step_000004)" in proc.stderr
    assert "--resume" in proc.stderr and "--restart-from-scratch" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(run_dir) == before


def reference_lr(step: int, total: int) -> float:
    """Linear warm-up from 0, then cosine to MIN_LR at `total`, MIN_LR after (written out, not imported)."""
    if step <= WARMUP:
        return LR * step / WARMUP
    if step > total:
        return MIN_LR
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (total - WARMUP)))


def logged_lr(run_dir: str) -> dict[int, float]:
    from adapt_pretrain.monitor import read_metrics

    return {s: line["scalars"]["lr"] for s, line in read_metrics(run_dir)[0].items()}


def test_empty_latest_and_extending_steps_keeps_the_lr_horizon(base, demo_data_dir, tmp_path):
    """An empty `latest` (the newest checkpoint is still found by the scan), and train.steps 4 -> 6 on
    resume: accepted; the schedule keeps its 4-step horizon, so the LR is min_lr after it."""
    run_dir, ckpt = copy_of(base, tmp_path)
    open(os.path.join(ckpt, "latest"), "w").close()
    proc = train_plain([*args(demo_data_dir, run_dir, "train.steps=6"), "--resume"])
    assert "checkpoints/latest is empty" in proc.stderr and "at step 4" in proc.stdout
    assert "keeping the checkpoint's LR schedule horizon of 4 steps" in proc.stderr
    lrs = logged_lr(run_dir)
    assert sorted(lrs) == [0, 1, 2, 3, 4, 5]
    for step, lr in lrs.items():
        assert lr == pytest.approx(reference_lr(step, total=4), rel=1e-9, abs=1e-12), step
    assert [e["fields"]["total_steps"] for e in events(run_dir, "lr_schedule_kept")] == [4]
    from adapt_pretrain.checkpointing import read_meta

    config = read_meta(os.path.join(ckpt, "step_000006"))["config"]
    assert (config["train"]["steps"], config["optim"]["total_steps"]) == (6, 4)


def test_extending_steps_with_replanned_lr(base, demo_data_dir, tmp_path):
    """--allow-change optim.total_steps re-plans the schedule for 6 steps from the current step on (logged)."""
    run_dir, _ = copy_of(base, tmp_path)
    proc = train_plain([*args(demo_data_dir, run_dir, "train.steps=6"), "--resume", "--allow-change",
                        "optim.total_steps"])
    assert "optim.total_steps 4 (checkpoint) -> 6 (now)" in proc.stderr
    lrs = logged_lr(run_dir)
    for step in (4, 5):
        assert lrs[step] == pytest.approx(reference_lr(step, total=6), rel=1e-9), step
    assert lrs[5] > MIN_LR * 1.5  # really the new horizon, not the old one's floor
    (override,) = events(run_dir, "resume_override")
    assert override["fields"] == {"field": "optim.total_steps", "checkpoint": 4, "now": 6}


def test_unexpected_error_is_printed_with_its_rank_and_exit_1(demo_data_dir, tmp_path):
    """An environment failure the trainer has no name for (run_dir below a regular file) still reaches
    the console with the rank on every traceback line, and exits 1."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = train_plain(args(demo_data_dir, str(blocker / "run")), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "adapt-pretrain train (rank 0): unexpected NotADirectoryError" in proc.stderr
    traceback = proc.stderr[proc.stderr.index("Traceback") - len("[rank 0] "):]
    assert all(line.startswith("[rank 0] ") for line in traceback.splitlines() if line.strip()), traceback

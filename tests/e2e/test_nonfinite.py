"""Non-finite loss handling with real processes: skip, log, stop; keep the last good checkpoint; continue.

A learning rate of 1e30 after one warm-up step blows the weights up at step 1's update, so step 2 and
every later loss is non-finite. With a checkpoint after every step and keep_checkpoints=1 the run must:
skip steps 2 and 3 (one event each), stop after max_nonfinite_in_row=2 with exit code 4, write no
checkpoint from the streak, keep step_000001 (the last one before it) although keep_checkpoints=1,
move step_000002 (written from the blown-up weights) aside, and print the exact arguments that
continue from step_000001 with a lower learning rate. Running those arguments (with a sane lr in place
of the suggested tenth) must resume from step_000001, log the override, and train on finite losses.
"""
from __future__ import annotations

import math
import os
import re

import pytest

from .conftest import TINY_MODEL
from .helpers import events, losses, train_plain

SANE_LR = 1e-3


def args(data_dir: str, run_dir: str, *extra: str) -> list[str]:
    return [*TINY_MODEL, f"data.data_dir={data_dir}", "data.num_workers=0", f"train.run_dir={run_dir}",
            "train.steps=10", "train.micro_batch_size=2", "train.progress_bar=false", "train.checkpoint_interval=1",
            "train.keep_checkpoints=1", "train.max_nonfinite_in_row=2", "optim.lr=1e30", "optim.min_lr=0",
            "optim.clip_grad=0", "adapt.enabled=true", "adapt.num_anchors=8", "wandb.enabled=false", *extra]


@pytest.fixture(scope="module")
def stopped(demo_data_dir, tmp_path_factory) -> dict:
    run_dir = str(tmp_path_factory.mktemp("nonfinite") / "run")
    cli = args(demo_data_dir, run_dir, "optim.warmup_steps=3")  # lr 0, then 3.3e29 from step 1
    proc = train_plain(cli, check=False)
    return {"run_dir": run_dir, "ckpt": os.path.join(run_dir, "checkpoints"), "proc": proc, "args": cli,
            "first_losses": losses(run_dir)}


def test_streak_skips_then_stops_with_exit_4(stopped):
    proc = stopped["proc"]
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "train.max_nonfinite_in_row=2" in proc.stderr and "Traceback" not in proc.stderr
    skipped = events(stopped["run_dir"], "nonfinite_step_skipped")
    assert [(e["step"], e["fields"]["in_row"]) for e in skipped] == [(2, 1), (3, 2)]
    logged = stopped["first_losses"]
    assert math.isfinite(logged[0]) and math.isfinite(logged[1]) and not math.isfinite(logged[2])


def test_no_checkpoint_from_the_streak_and_the_last_good_one_is_kept(stopped):
    ckpt = stopped["ckpt"]
    step_dirs = sorted(n for n in os.listdir(ckpt) if n.startswith("step_"))
    assert step_dirs == ["step_000001"]  # kept although keep_checkpoints=1 and step_000002 was saved after it
    assert open(os.path.join(ckpt, "pinned")).readline().strip() == "step_000001"
    (aside,) = [n for n in os.listdir(ckpt) if n.startswith("superseded_")]
    assert sorted(n for n in os.listdir(os.path.join(ckpt, aside)) if n.startswith("step_")) == ["step_000002"]
    assert not any(n.startswith(("step_000003", "step_000004")) for _, dirs, _ in os.walk(ckpt) for n in dirs)
    assert [e["fields"]["checkpoint"] for e in events(stopped["run_dir"], "checkpoint_pinned")] == ["step_000001"]
    assert "checkpoint not written (1 non-finite step(s) in a row)" in stopped["proc"].stderr


def test_the_printed_arguments_continue_with_a_lower_lr(stopped):
    message = stopped["proc"].stderr
    match = re.search(r"these arguments added:\n  (.+)\n", message)
    assert match, message[-3000:]
    suggested = match.group(1).split()
    assert suggested[:4] == ["--resume", os.path.join(stopped["ckpt"], "step_000001"), "--allow-change", "optim.lr"]
    assert suggested[4] == "optim.lr=1e+29"
    suggested[4] = f"optim.lr={SANE_LR}"  # the suggestion is a tenth; this test wants a sane value
    proc = train_plain([*stopped["args"], "train.steps=5", *suggested])
    assert "resumed from" in proc.stdout and "at step 1" in proc.stdout
    assert "--allow-change: optim.lr 1e+30 (checkpoint) -> 0.001 (now)" in proc.stderr
    run = losses(stopped["run_dir"])
    assert sorted(run) == [0, 1, 2, 3, 4] and all(math.isfinite(run[s]) for s in run)
    assert run[1] == stopped["first_losses"][1]  # the same weights as before the streak
    (override,) = events(stopped["run_dir"], "resume_override")
    assert override["fields"] == {"field": "optim.lr", "checkpoint": 1e30, "now": SANE_LR}
    from adapt_pretrain.monitor import read_metrics

    assert read_metrics(stopped["run_dir"])[0][3]["scalars"]["lr"] == pytest.approx(SANE_LR)  # warm-up done


def test_without_a_good_checkpoint_the_message_says_start_over(demo_data_dir, tmp_path):
    """No warm-up: step 0's update already blows up, so no checkpoint predates the streak."""
    run_dir = str(tmp_path / "run")
    proc = train_plain(args(demo_data_dir, run_dir), check=False)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "No checkpoint from before the streak exists" in proc.stderr
    assert "--restart-from-scratch optim.lr=1e+29" in proc.stderr
    assert not [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith("step_")]

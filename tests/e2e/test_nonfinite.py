"""Non-finite loss handling: skip the update, log it, stop after `train.max_nonfinite_in_row` in a row.

A learning rate of 1e30 blows the weights up after the first update, so every following loss is
non-finite. The run must skip those updates, log one event per skipped step, and stop with exit
code 3 and a message naming the setting, after exactly `max_nonfinite_in_row` consecutive ones.
"""
from __future__ import annotations

import math

from .conftest import TINY_MODEL
from .helpers import events, losses, train_plain


def test_nonfinite_steps_are_skipped_then_stop(demo_data_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = train_plain([*TINY_MODEL, f"data.data_dir={demo_data_dir}", "data.num_workers=0", f"train.run_dir={run_dir}",
                        "train.steps=10", "train.micro_batch_size=2", "train.progress_bar=false",
                        "train.max_nonfinite_in_row=2", "optim.lr=1e30", "optim.min_lr=0", "optim.clip_grad=0",
                        "adapt.enabled=true", "adapt.num_anchors=8", "wandb.enabled=false"], check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "train.max_nonfinite_in_row=2" in proc.stderr and "Traceback" not in proc.stderr
    skipped = events(run_dir, "nonfinite_step_skipped")
    assert [e["fields"]["in_row"] for e in skipped] == [1, 2]
    logged = losses(run_dir)
    assert math.isfinite(logged[0])  # the first step was fine and updated the weights
    assert [e["step"] for e in skipped] == [1, 2] and not math.isfinite(logged[1])

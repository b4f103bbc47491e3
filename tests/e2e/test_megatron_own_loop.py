"""The megatron-core plugin surface: a user's own loop (launch/examples/megatron_own_loop.py) trains
exactly like our trainer, and the example runs as docs/PLUGIN.md writes it.

Both are real single processes on the prepared demo data, same config, seed and micro-batches;
the trainer takes ADAPT through the same `AdaptMegatron` surface, so the losses must be *equal*
(same operations in the same order: any difference is a different code path, e.g. a loop that
leaves megatron's own per-token normaliser in place of `finalize_model_grads`).
"""
from __future__ import annotations

import os
import re
import shlex

from .conftest import TINY_MODEL
from .helpers import PYTHON, REPO, events, losses, run, train_plain

STEPS = 3
CONFIG = "launch/configs/demo-cpu.yaml"
EXAMPLE = "launch/examples/megatron_own_loop.py"


def _overrides(data_dir: str, run_dir: str) -> list[str]:
    # refresh_interval=2: anchors at steps 0 and 2, so later steps run on a refreshed centroid
    return [*TINY_MODEL, f"data.data_dir={data_dir}", "data.num_workers=0", f"train.run_dir={run_dir}",
            f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.progress_bar=false", "optim.warmup_steps=1", "adapt.enabled=true", "adapt.num_anchors=8",
            "adapt.refresh_interval=2", "wandb.enabled=false"]


def _weight_means(run_dir: str) -> list[float]:
    from adapt_pretrain.monitor import read_metrics

    steps, _ = read_metrics(run_dir)
    return [steps[s]["scalars"]["adapt/weight_mean"] for s in sorted(steps)]


def test_own_loop_losses_equal_the_trainers(demo_data_dir, tmp_path):
    ours, theirs = str(tmp_path / "trainer"), str(tmp_path / "own_loop")
    train_plain(["--config", CONFIG, *_overrides(demo_data_dir, ours)])
    run([PYTHON, EXAMPLE, "--config", CONFIG, *_overrides(demo_data_dir, theirs)])
    trainer, own = losses(ours), losses(theirs)
    assert sorted(trainer) == list(range(STEPS)) and sorted(own) == list(range(STEPS))
    assert [own[s] for s in range(STEPS)] == [trainer[s] for s in range(STEPS)], (own, trainer)
    weights = _weight_means(theirs)
    assert weights == _weight_means(ours)
    assert any(w < 0.999 for w in weights), weights  # ADAPT really reweighted (not plain CE)
    refresh = [(e["step"], e.get("num_anchors")) for e in events(theirs, "anchor_refresh")]
    assert refresh == [(e["step"], e.get("num_anchors")) for e in events(ours, "anchor_refresh")]
    assert [step for step, _ in refresh] == [0, 2]


def _documented_command() -> list[str]:
    """The example's command line as docs/PLUGIN.md shows it (the line starting `python launch/examples/`)."""
    with open(os.path.join(REPO, "docs", "PLUGIN.md")) as f:
        lines = [ln.strip() for ln in f if re.match(rf"\s*python {re.escape(EXAMPLE)}", ln)]
    assert lines, f"docs/PLUGIN.md shows no `python {EXAMPLE}` command"
    return shlex.split(lines[0])


def test_example_runs_as_documented(tmp_path):
    """The documented command (it prepares the demo corpus itself), shortened to 2 steps in a temporary run dir."""
    cmd = _documented_command()
    assert cmd[0] == "python"
    run_dir = str(tmp_path / "run")
    proc = run([PYTHON, *cmd[1:], "train.steps=2", "optim.warmup_steps=1", f"train.run_dir={run_dir}"], timeout=300)
    assert "[step 1] loss=" in proc.stdout, proc.stdout[-2000:]
    assert sorted(losses(run_dir)) == [0, 1]
    assert os.path.exists(os.path.join(run_dir, "data", "manifest.json"))

"""Real launchers, exact resume, and refusal to resume a changed layout/config (2 CPU processes, gloo).

One scenario, four launches, so the suite stays CI-sized:
  full   `deepspeed --num_gpus 2 --module adapt_pretrain.train --config launch/configs/demo-cpu.yaml`
         (CI-sized overrides): the demo config under the deepspeed launcher, uninterrupted, 6 steps;
  leg 1  the two-node `--no_ssh --node_rank R --num_nodes 2 --master_addr 127.0.0.1` form (two launcher
         invocations on this machine), stopped after step 3 with a checkpoint;
  leg 2  torchrun `--resume` of leg 1's checkpoint, to step 6 (with a safe change: log interval);
  refuse one plain process resuming that 2-process checkpoint with adapt.tau changed;
  faults a copy of the 2-process checkpoints damaged on rank 1 only, resumed by deepspeed: rank 1's
         problems reach the console with its rank, both ranks stop together with exit code 3.
The resumed run must equal the uninterrupted one bit for bit (losses and final parameters): model,
optimiser, scheduler, RNG, data-stream position and ADAPT state all come back. ADAPT is on and the
anchors refresh every 2 steps, so a refresh (step 4) happens after the resume point. It also shows
that deepspeed's two forms and torchrun give the processes the same ranks (identical numbers).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from .conftest import TINY_MODEL
from .helpers import (DEEPSPEED, REPO, assert_same_params, env, events, free_port, losses, model_state, snapshot,
                      train_deepspeed, train_plain, train_torchrun)

STEPS = 6
DEMO = os.path.join(REPO, "launch", "configs", "demo-cpu.yaml")


def args(data_dir: str, run_dir: str, *extra: str) -> list[str]:
    return ["--config", DEMO, *TINY_MODEL, f"data.data_dir={data_dir}", "prepare.vocab_size=1024",
            f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=8",
            "train.log_interval=1", "train.progress_bar=false", "train.checkpoint_interval=3", "optim.warmup_steps=1",
            "adapt.refresh_interval=2", "adapt.num_anchors=8", "wandb.enabled=false", *extra]


def two_node_no_ssh(tmp_path, cli_args: list[str]) -> None:
    """deepspeed's per-node form, both 'nodes' on this machine (a hostfile only supplies slot counts)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    common = ["--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--num_gpus", "1",
              "--master_addr", "127.0.0.1", "--master_port", str(port), "--module", "adapt_pretrain.train", *cli_args]
    node1 = subprocess.Popen([DEEPSPEED, "--node_rank", "1", *common], cwd=REPO, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        node0 = subprocess.run([DEEPSPEED, "--node_rank", "0", *common], cwd=REPO, env=env(), capture_output=True,
                               text=True, timeout=240)
        out1, _ = node1.communicate(timeout=60)
    finally:
        if node1.poll() is None:
            node1.kill()
    assert node0.returncode == 0 and node1.returncode == 0, (node0.stdout[-3000:], node0.stderr[-3000:], out1[-3000:])


@pytest.fixture(scope="module")
def runs(demo_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    full, part = str(root / "full"), str(root / "part")
    ds = train_deepspeed(["--num_gpus", "2", "--master_port", str(free_port())], args(demo_data_dir, full))
    two_node_no_ssh(root, args(demo_data_dir, part, "train.stop_at_step=3"))
    first_leg = losses(part)
    resumed = train_torchrun(2, [*args(demo_data_dir, part, "train.log_interval=2"), "--resume"])
    return {"full": full, "part": part, "first_leg": first_leg, "ds_log": ds.stdout + ds.stderr,
            "resume_log": resumed.stdout + resumed.stderr}


def test_deepspeed_demo_config_completes(runs):
    assert "done: 6 steps" in runs["ds_log"]
    assert "--local_rank=" in runs["ds_log"]  # the deepspeed launcher passed it and the trainer accepted it
    assert sorted(losses(runs["full"])) == list(range(STEPS))
    assert os.path.exists(os.path.join(runs["full"], "checkpoints", "step_000006", "run", "rng_rank00001.pt"))


def test_two_node_no_ssh_then_resume_matches_uninterrupted(runs):
    full, part = losses(runs["full"]), losses(runs["part"])
    assert sorted(runs["first_leg"]) == [0, 1, 2]
    assert "resumed from" in runs["resume_log"] and "at step 3" in runs["resume_log"]
    assert sorted(part) == list(range(STEPS))
    assert [full[s] for s in range(STEPS)] == [part[s] for s in range(STEPS)]  # exact, not approximate
    assert_same_params(model_state(runs["full"], STEPS), model_state(runs["part"], STEPS))
    for run in (runs["full"], runs["part"]):  # anchors refreshed at the same steps, after the resume too
        assert [e["step"] for e in events(run, "anchor_refresh")] == [0, 2, 4]
    from adapt_pretrain.monitor import read_metrics

    counters = ("train/tokens", "train/consumed_samples", "train/skipped_steps")  # restored with the metrics callback
    full_lines, part_lines = read_metrics(runs["full"])[0], read_metrics(runs["part"])[0]
    assert [[full_lines[s]["scalars"][k] for k in counters] for s in range(STEPS)] \
        == [[part_lines[s]["scalars"][k] for k in counters] for s in range(STEPS)]


def test_resume_refuses_changed_layout_and_config(runs, demo_data_dir):
    """The 2-process checkpoint resumed by 1 process with another tau: refused, naming the config
    change (the layout change alone is allowed: same global batch)."""
    proc = train_plain([*args(demo_data_dir, runs["part"], "adapt.tau=2.0"), "--resume"], check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    message = proc.stderr
    assert "cannot resume from checkpoint at step 6" in message
    assert "global batch" not in message and "dp: 2" not in message
    assert "adapt.tau: 1.0 (checkpoint) -> 2.0 (now)" in message
    assert "Traceback" not in message


def test_rank_1_errors_reach_the_console_with_its_rank(runs, demo_data_dir, tmp_path):
    """Rank 1's RNG file of step 6 is missing, and its step-3 RNG file is a valid torch file that rank 1 cannot
    use (rewritten without the python stream, checksums updated: what another trainer version would write).
    Rank 1's verification problem is reported with its rank and the resume falls back to step 3; rank 1's
    load failure is printed by rank 1 with its rank; rank 0 stops too (no hang); exit code 3; nothing moved."""
    import torch

    from adapt_pretrain.checkpointing import describe_files, write_manifest

    run_dir = str(tmp_path / "part")
    shutil.copytree(runs["part"], run_dir)
    ckpt = os.path.join(run_dir, "checkpoints")
    rng_1 = "run/rng_rank00001.pt"  # read by rank 1 only
    os.remove(os.path.join(ckpt, "step_000006", rng_1))
    step3 = os.path.join(ckpt, "step_000003")
    state = torch.load(os.path.join(step3, rng_1), weights_only=False)
    del state["python"]
    torch.save(state, os.path.join(step3, rng_1))
    manifest = __import__("json").load(open(os.path.join(step3, "manifest.json")))
    assert manifest["files"][rng_1]["rank"] == 1
    write_manifest(step3, 3, {**manifest["files"], **describe_files(step3, [rng_1], rank=1)})
    before = snapshot(run_dir)
    proc = train_deepspeed(["--num_gpus", "2", "--master_port", str(free_port())],
                           [*args(demo_data_dir, run_dir), "--resume"], check=False, timeout=180)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 3, log[-4000:]
    assert f"step_000006: {rng_1} is missing (rank 1)" in log and "falling back to step_000003" in log
    assert "adapt-pretrain train (rank 1): cannot load" in log and "KeyError" in log and "'python'" in log
    assert "adapt-pretrain train (rank 0): rank(s) [1] could not load" in log
    assert "Traceback" not in log
    assert snapshot(run_dir) == before

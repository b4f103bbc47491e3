"""The trainer's sharded checkpoints end to end (real `adapt-pretrain train` processes on gloo):
a kill -9 in the middle of a save leaves the previous checkpoint loadable; a 2-process checkpoint
resumes in 1 process (another layout); a legacy per-rank checkpoint is refused with a clear message.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import torch

from tests.e2e.conftest import TINY_MODEL
from tests.e2e.helpers import PYTHON, REPO, env, free_port, losses, train_plain, train_torchrun

DEMO = os.path.join(REPO, "launch", "configs", "demo-cpu.yaml")


def args(data_dir: str, run_dir: str, *extra: str) -> list[str]:
    return ["--config", DEMO, *TINY_MODEL, f"data.data_dir={data_dir}", "prepare.vocab_size=1024",
            f"train.run_dir={run_dir}", "train.steps=6", "train.micro_batch_size=2", "train.global_batch_size=8",
            "train.log_interval=1", "train.progress_bar=false", "train.checkpoint_interval=1", "optim.warmup_steps=1",
            "adapt.refresh_interval=2", "adapt.num_anchors=8", "wandb.enabled=false", *extra]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own, so killing
    torchrun's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_during_save(run_dir: str, data_dir: str, step: int) -> None:
    """Start a 2-process run and SIGKILL every process of it as soon as the save of `step` has begun."""
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "adapt_pretrain.train", *args(data_dir, run_dir, "train.stop_at_step=4")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root, name = os.path.join(run_dir, "checkpoints"), f"step_{step:06d}"
    deadline = time.time() + 300

    def started() -> bool:  # any directory of that step (the save's temporary one, or the final one)
        return os.path.isdir(root) and any(entry.startswith(name) for entry in os.listdir(root))

    try:
        while not started():
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the run ended before saving step {step}:\n{proc.stdout.read().decode()[-3000:]}")
            time.sleep(0.005)
    finally:
        for pid in _descendants(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
        time.sleep(1.0)  # let the killed workers' exits settle before the directory is inspected


def test_kill_during_save_then_resume_in_another_layout(demo_data_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    _kill_during_save(run_dir, demo_data_dir, step=2)
    root = os.path.join(run_dir, "checkpoints")
    assert not os.path.exists(os.path.join(root, "step_000002")), \
        "step_000002 exists although its save was killed (written in place, or the kill came after the commit)"
    assert open(os.path.join(root, "latest")).read().strip() == "step_000001"
    assert os.path.isfile(os.path.join(root, "step_000001", "model", "metadata.json"))
    # the previous checkpoint loads: the same layout resumes from it and saves step 2 over the leftovers
    resumed = train_torchrun(2, [*args(demo_data_dir, run_dir, "train.stop_at_step=4"), "--resume"], timeout=400)
    log = resumed.stdout + resumed.stderr
    assert "step_000001 at step 1" in log and "done: 3 steps" in log, log[-3000:]
    # keep_checkpoints=2, plus step 2: pruning waits for a finite step after the newest save (step 4 is the last)
    assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == ["step_000002", "step_000003", "step_000004"]
    # the 2-process (data-parallel 2) checkpoint resumes in one process, to step 6
    one = train_plain([*args(demo_data_dir, run_dir), "--resume"], timeout=400)
    log = one.stdout + one.stderr
    assert "resuming with another layout" in log and "step_000004 at step 4" in log and "done: 2 steps" in log
    got = losses(run_dir)
    assert sorted(got) == list(range(6)) and all(0 < got[s] < 10 for s in got)
    meta = json.load(open(os.path.join(root, "step_000006", "meta.json")))
    assert meta["layout"]["dp"] == 1 and meta["state"] == "sharded"


def test_legacy_checkpoint_is_refused_with_a_clear_message(demo_data_dir, tmp_path):
    run_dir = tmp_path / "legacy"
    step = run_dir / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 2, "format": 1, "config": {}, "layout": {}}))
    torch.save({"step_fn": {}}, step / "rank_00000.pt")
    (run_dir / "checkpoints" / "latest").write_text("step_000002")
    proc = train_plain([*args(demo_data_dir, str(run_dir)), "--resume"], check=False, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "legacy checkpoint (one rank_NNNNN.pt per rank" in proc.stderr and "Traceback" not in proc.stderr

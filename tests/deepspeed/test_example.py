"""The DeepSpeed example runs from docs/PLUGIN.md as written: the commands of the "Run the example"
block of its "DeepSpeed engine" section, in a scratch directory that sees the repository's `launch/` (so the relative paths in the
commands resolve), with one change: a free `--master_port` for the deepspeed launcher."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from tests.distributed_helper import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def documented_commands() -> list[str]:
    with open(os.path.join(REPO, "docs", "PLUGIN.md"), encoding="utf-8") as f:
        text = f.read()
    deepspeed_part = text.split("## DeepSpeed engine", 1)[1]
    section = deepspeed_part.split("### Run the example", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("ds_example")
    os.symlink(os.path.join(REPO, "launch"), work / "launch")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    logs = []
    for line in documented_commands():
        argv = shlex.split(line)
        if argv[0] == "deepspeed":
            argv[1:1] = ["--master_port", str(free_port())]
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{line}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
        logs.append(proc.stdout)
    return work, logs


def test_documented_example_trains_and_logs(example_run):
    from adapt_pretrain.monitor import read_metrics

    work, logs = example_run
    run_dir = work / "runs" / "deepspeed-hf"
    steps, events = read_metrics(str(run_dir))
    assert sorted(steps) == list(range(20))
    losses = [steps[s]["scalars"]["loss"] for s in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
    scalars = steps[19]["scalars"]
    assert scalars["adapt/groups"] > 0 and "grad_norm" in scalars
    assert "domain/python_doc/mean_weight" in scalars  # the curriculum rows reach the monitor
    # the trainer's throughput keys; the Llama's shape comes from its HF config (no MFU on a CPU)
    assert scalars["train/tokens_per_s"] > 0 and scalars["train/tflops_per_device"] > 0
    sequences = 4 * 2 * 2  # the example's defaults: micro-batch 4, 2 accumulation steps, 2 processes
    assert scalars["train/consumed_samples"] == 20 * sequences and scalars["train/skipped_steps"] == 0
    assert [e["step"] for e in events if e["event"] == "anchor_refresh"] == [0, 10]
    assert any(name.startswith("offline-run-") for name in os.listdir(run_dir / "wandb"))
    assert "[step 19] loss=" in logs[-1]


def test_checkpoint_holds_adapt_state(example_run):
    work, _ = example_run
    ckpt = work / "runs" / "deepspeed-hf" / "checkpoint"
    tag = (ckpt / "latest").read_text().strip()
    files = sorted((ckpt / tag).glob("*model_states.pt"))  # ZeRO-3: one per rank, each with the client state
    assert files
    for path in files:
        anchors = torch.load(path, map_location="cpu", weights_only=False)["adapt"]["engine"]["anchors"]
        assert anchors["num_refreshes"] == 2 and anchors["centroid"].shape == (64,)
        counters = torch.load(path, map_location="cpu", weights_only=False)["adapt"]["counters"]
        assert counters["consumed_samples"] == 20 * 4 * 2 * 2 and counters["skipped_steps"] == 0

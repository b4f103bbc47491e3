"""W&B start-up faults: an unreachable server falls back to an offline run, within a bounded time;
a resumed training run continues the same W&B run.

The unreachable server is real: WANDB_BASE_URL points at a local port nobody listens on, with a
(fake) API key set and mode=online, in a fresh process so no earlier wandb state interferes. What
the offline run holds is read back from its `.wandb` file with our reader and compared with
metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from adapt_pretrain.monitor import Monitor, WandbConfig, read_metrics
from adapt_pretrain.monitor.wandb_mirror import RUN_ID_FILE
from adapt_pretrain.monitor.wandb_reader import iter_records

INIT_TIMEOUT_S = 5.0
START_MARGIN_S = 30.0  # process start, the offline run's start, a loaded machine

SCRIPT = r"""
import json, sys, time
from adapt_pretrain.monitor import Monitor, WandbConfig
t0 = time.monotonic()
mon = Monitor(sys.argv[1], {"a": 1}, WandbConfig(mode="online", init_timeout=float(sys.argv[2])), rank=0, stdout=False)
started = time.monotonic() - t0
for step in range(3):
    mon.log_step(step, {"loss": 1.0 / (step + 1)})
mon.close()
print(json.dumps({"start_s": started}))
"""


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: connections are refused


def run_ids(run_dir: str) -> list[str]:
    """The run id recorded inside each offline `.wandb` file under run_dir, oldest run first."""
    wandb_dir = os.path.join(run_dir, "wandb")
    ids = []
    for name in sorted(n for n in os.listdir(wandb_dir) if n.startswith("offline-run-")):
        (log,) = [f for f in os.listdir(os.path.join(wandb_dir, name)) if f.endswith(".wandb")]
        ids += [r.run.run_id for r in iter_records(os.path.join(wandb_dir, name, log), strict=False)
                if r.WhichOneof("record_type") == "run"][:1]
    return ids


def test_unreachable_server_falls_back_to_an_offline_run(tmp_path):
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}", WANDB_API_KEY="f" * 40,
               WANDB_SILENT="true")
    env.pop("WANDB_MODE", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, run_dir, str(INIT_TIMEOUT_S)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start_s = json.loads(proc.stdout.strip().splitlines()[-1])["start_s"]
    assert start_s < INIT_TIMEOUT_S + START_MARGIN_S, (start_s, time.monotonic() - t0)
    assert "W&B online start failed" in proc.stderr and "OFFLINE" in proc.stderr and "wandb sync --id" in proc.stderr
    meta = json.load(open(os.path.join(run_dir, "monitor.json")))["wandb"]
    run_id = open(os.path.join(run_dir, RUN_ID_FILE)).read().strip()
    assert meta["mode"] == "offline" and meta["run_id"] == run_id
    assert meta["sync_command"] == f"wandb sync --id {run_id} {run_dir}/wandb/offline-run-*-{run_id}"
    assert run_ids(run_dir) == [run_id]
    _, events = read_metrics(run_dir)
    assert [e["event"] for e in events] == ["wandb_offline_fallback"]
    from adapt_pretrain.monitor.verify import verify_wandb_mirror

    check = verify_wandb_mirror(run_dir, timeout=60)
    assert check.mismatches == [] and check.steps == 3  # the offline run holds what was logged


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    run_dir = str(tmp_path / "run")
    for start in (0, 3):  # a training run and its resume
        mon = Monitor(run_dir, {"a": 1}, WandbConfig(mode="offline"), rank=0, stdout=False)
        for step in range(start, start + 3):
            mon.log_step(step, {"loss": float(step)})
        mon.close()
        time.sleep(1.1)  # offline run folders are named by the second they start
    run_id = open(os.path.join(run_dir, RUN_ID_FILE)).read().strip()
    assert run_ids(run_dir) == [run_id, run_id]
    meta = json.load(open(os.path.join(run_dir, "monitor.json")))["wandb"]
    assert meta["run_id"] == run_id and f"offline-run-*-{run_id}" in meta["sync_command"]
    assert sorted(read_metrics(run_dir)[0]) == list(range(6))

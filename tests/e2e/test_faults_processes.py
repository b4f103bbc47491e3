"""Process faults injected into real training runs (gloo, CPU): a hung rank, a killed rank.

- Hung rank: under the deepspeed launcher, rank 1 is SIGSTOPped mid-run. The watchdog of rank 0
  must name rank 1 as stuck (with every rank's position and this rank's stacks) within the
  configured timeout plus a margin, and the job must end with the watchdog's exit code instead of
  waiting for torch's 30-minute default. Every DataLoader worker of both ranks must be gone after.
- Killed rank: kill -9 of a rank (plain process, torchrun) with data.num_workers > 0: its DataLoader
  workers must be gone within seconds (before, they lived on for good). Under deepspeed the hung-rank
  test covers it: rank 0 leaves through os._exit, its worker is orphaned unless it dies with it.
Margins are generous (a loaded 2-core machine); the bounds are still far below the old half hour.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from .conftest import TINY_MODEL
from .helpers import DEEPSPEED, PYTHON, REPO, env, free_port

HANG_TIMEOUT_S = 20.0       # train.collective_timeout_s of the hang test
REPORT_MARGIN_S = 30.0      # watchdog poll + report on a loaded machine
LAUNCHER_GRACE_S = 30.0     # deepspeed sends SIGTERM, waits 30 s, then SIGKILLs a stopped rank
WORKERS_GONE_S = 10.0


def train_args(data_dir: str, run_dir: str, *extra: str) -> list[str]:
    # Micro-batches of 8 x 256 tokens (~80 KB through the worker's pipe): the prefetched ones fill the
    # pipe, so a worker of a killed rank blocks for good flushing them unless it is killed with its rank
    # (with tiny batches torch's own parent check ends it within 5 s and the test could not fail).
    return ["-m", "adapt_pretrain.train", *TINY_MODEL, "model.seq_len=256", f"data.data_dir={data_dir}",
            "data.num_workers=1", f"train.run_dir={run_dir}", "train.steps=100000", "train.micro_batch_size=8",
            "train.progress_bar=false",
            "train.log_interval=1000", "adapt.enabled=false", "wandb.enabled=false", *extra]


def launch(cmd: list[str], log_path: str) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def deepspeed_cmd(nproc: int, args: list[str]) -> list[str]:
    return [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()), "--module", *args[1:]]


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *args]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) while waiting for {what}\n{_tail(log)}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{_tail(log)}")


def _tail(path: str) -> str:
    return open(path).read()[-5000:] if path and os.path.exists(path) else ""


def steps_logged(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    return sum(1 for line in open(path) if '"scalars"' in line) if os.path.exists(path) else 0


def rank_processes(root: psutil.Process) -> dict[int, psutil.Process]:
    """Training ranks: `root` itself for a plain process, else the processes under the launcher with
    RANK set whose parent has none (their DataLoader workers inherit it)."""
    if root.cmdline()[1:3] == ["-m", "adapt_pretrain.train"]:
        return {0: root}  # a plain process: python -m adapt_pretrain.train ...
    out = {}
    for proc in root.children(recursive=True):
        try:
            if "RANK" in proc.environ() and "RANK" not in proc.parent().environ():
                out[int(proc.environ()["RANK"])] = proc
        except psutil.Error:
            continue
    return out


def training_root(proc: subprocess.Popen) -> psutil.Process:
    return psutil.Process(proc.pid)


def alive(procs: list[psutil.Process]) -> list[int]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(procs)


def kill_tree(proc: subprocess.Popen, also: list[psutil.Process] = ()) -> None:
    """End everything this test started: the launcher's session, and `also` (workers that may have
    left it: torchrun starts each rank in a session of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in also:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=30)


def running_with_workers(proc: subprocess.Popen, run_dir: str, nranks: int, min_steps: int = 2):
    """{rank: (process, [worker processes])} once every rank runs and rank 0 logged `min_steps` steps."""
    def ready():
        if steps_logged(run_dir) < min_steps:
            return None
        ranks = rank_processes(training_root(proc))
        if len(ranks) < nranks:
            return None
        found = {r: (p, p.children()) for r, p in ranks.items()}
        return found if all(workers for _, workers in found.values()) else None
    return ready


def test_hung_rank_is_named_and_the_job_ends(demo_data_dir, tmp_path):
    run_dir, log = str(tmp_path / "run"), str(tmp_path / "log.txt")
    args = train_args(demo_data_dir, run_dir, f"train.collective_timeout_s={HANG_TIMEOUT_S}",
                      "train.global_batch_size=16")
    proc = launch(deepspeed_cmd(2, args), log)
    workers: list[psutil.Process] = []
    try:
        ranks = wait_for(running_with_workers(proc, run_dir, 2, min_steps=3), 240, "2 ranks stepping", proc, log)
        time.sleep(3)  # let the heartbeats carry a step number
        workers = [w for _, ws in ranks.values() for w in ws]
        stuck_pid = ranks[1][0].pid
        os.kill(stuck_pid, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: "stuck rank(s): 1 " in open(log).read(), HANG_TIMEOUT_S + REPORT_MARGIN_S,
                 "the watchdog's report", proc, log)
        reported = time.monotonic() - stopped
        code = proc.wait(timeout=HANG_TIMEOUT_S + REPORT_MARGIN_S + LAUNCHER_GRACE_S + 15)
        ended = time.monotonic() - stopped
        left = wait_gone(workers, WORKERS_GONE_S)
    finally:
        kill_tree(proc, workers)
    text = open(log).read()
    assert code == 124, text[-4000:]  # the watchdog's exit code, passed on by the launcher
    assert reported < HANG_TIMEOUT_S + REPORT_MARGIN_S and ended < HANG_TIMEOUT_S + REPORT_MARGIN_S + LAUNCHER_GRACE_S + 15
    assert f"rank 1 (pid {stuck_pid} " in text and "heartbeat silent" in text
    assert "rank 0: no progress for" in text and "Python stacks of rank 0" in text
    assert "waiting in a collective" in text  # rank 0's own position
    assert left == [], f"DataLoader workers still alive: {left}"


@pytest.mark.parametrize("launcher", ["plain", "torchrun"])  # deepspeed: see the hung-rank test
def test_killed_rank_leaves_no_loader_workers(demo_data_dir, tmp_path, launcher):
    run_dir, log = str(tmp_path / "run"), str(tmp_path / "log.txt")
    nranks = 1 if launcher == "plain" else 2
    args = train_args(demo_data_dir, run_dir, f"train.global_batch_size={8 * nranks}")
    cmd = {"plain": [PYTHON, *args], "torchrun": torchrun_cmd(2, args), "deepspeed": deepspeed_cmd(2, args)}[launcher]
    proc = launch(cmd, log)
    workers: list[psutil.Process] = []
    try:
        ranks = wait_for(running_with_workers(proc, run_dir, nranks), 240, "ranks stepping", proc, log)
        victim, workers = ranks[nranks - 1]
        victim.kill()  # SIGKILL: no Python code of the rank runs any more
        left = wait_gone(workers, WORKERS_GONE_S)
    finally:
        kill_tree(proc, workers)
    assert left == [], f"{launcher}: DataLoader workers of the killed rank still alive after {WORKERS_GONE_S} s: {left}"


def test_stuck_rank_rules():
    """Silent heartbeat first; else the rank busy outside a collective; else the rank behind."""
    from adapt_pretrain.watchdog import Heartbeat, stuck_ranks

    def beat(rank, step, age, waiting):
        return Heartbeat(rank, step, 100.0 - age, 0.0, 1000 + rank, "host", [], waiting)

    silent = {0: beat(0, 5, 0.5, True), 1: beat(1, 5, 30.0, False), 2: beat(2, 5, 1.0, False)}
    assert stuck_ranks(silent, 100.0, 10.0)[0] == [1]
    busy = {0: beat(0, 5, 0.5, True), 1: beat(1, 5, 1.0, False), 2: beat(2, 5, 1.0, True)}
    assert stuck_ranks(busy, 100.0, 10.0)[0] == [1]
    behind = {0: beat(0, 5, 0.5, True), 1: beat(1, 4, 1.0, True)}
    assert stuck_ranks(behind, 100.0, 10.0)[0] == [1]
    assert stuck_ranks({0: beat(0, 5, 0.5, True), 1: beat(1, 5, 1.0, True)}, 100.0, 10.0)[0] == []

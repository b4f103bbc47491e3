"""Worker processes die with their parent: each of the two mechanisms alone, with real processes.

A parent forks a child that calls `die_with_parent`, then the parent is killed with SIGKILL (no
Python code of it runs). The child must be gone within seconds: by the kernel's parent-death signal
alone (the poll thread disabled), and by the parent-pid poll alone (prctl disabled, as on a platform
without it). The module is loaded by path so the child does not import torch.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

WORKERS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "adapt_pretrain", "data", "workers.py")
SCRIPT = r"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("workers", sys.argv[1])
workers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workers)
if sys.argv[2] == "poll-only":
    workers._set_pdeathsig = lambda: False
else:
    workers._watch_parent = lambda parent_pid: None
parent = os.getpid()
pid = os.fork()
if pid == 0:
    workers.die_with_parent(parent)
    time.sleep(120)
    os._exit(0)
print(pid, flush=True)
time.sleep(120)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork + prctl: Linux")
@pytest.mark.parametrize("mechanism", ["pdeathsig-only", "poll-only"])
def test_child_dies_with_its_killed_parent(mechanism):
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT, WORKERS, mechanism], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        time.sleep(0.5)
        assert not gone(child)
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5.0
        while not gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(child), f"{mechanism}: the child outlived its parent"
    finally:
        parent.kill()
        if not gone(child):
            os.kill(child, 9)

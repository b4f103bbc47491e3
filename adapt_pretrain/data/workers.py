"""Worker processes (DataLoader workers, prepare's tokenising pool) that die with their parent.

Why: when a training rank is killed (kill -9, the out-of-memory killer, a launcher tearing the job
down), its DataLoader workers are re-parented, not killed; they then block for ever flushing a batch
into a pipe nobody reads, holding their memory (hundreds of MB each). A launcher cannot clean them
up: they have left the dead rank's process tree. So each worker arranges its own end:
- on Linux, `prctl(PR_SET_PDEATHSIG, SIGKILL)`: the kernel kills the worker when the thread that
  forked it exits (the trainer creates its loaders on the main thread, so: when the rank dies);
- everywhere, a daemon thread that polls the parent pid once a second and kills the worker when the
  parent has changed (the fallback where prctl is missing, and the guard for the race where the
  parent died before prctl ran).
Use: `DataLoader(..., worker_init_fn=die_with_parent_init())` or call `die_with_parent(pid)` first
thing in a pool initializer.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import sys
import threading
from typing import Any, Callable

PR_SET_PDEATHSIG = 1
POLL_S = 1.0


def _set_pdeathsig() -> bool:
    """Ask the kernel to SIGKILL this process when its parent thread exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_S):
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(parent_pid: int, *_: Any) -> None:
    """Make this process end when process `parent_pid` (its parent) ends. Extra arguments are ignored
    so it can serve directly as a DataLoader `worker_init_fn` (which passes the worker id)."""
    _set_pdeathsig()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="adapt-parent-watch", daemon=True).start()


def die_with_parent_init() -> Callable[..., None]:
    """A picklable `worker_init_fn` bound to the calling process as the parent."""
    return functools.partial(die_with_parent, os.getpid())


__all__ = ["die_with_parent", "die_with_parent_init"]

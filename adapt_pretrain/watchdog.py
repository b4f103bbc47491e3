"""Hang watchdog: a rank that stops making progress ends the job with a report, not a silent wait.

Why: when one rank is stopped, killed or stuck, every other rank blocks inside its next collective,
and the job idles until the process-group timeout (torch's default: 30 minutes), printing nothing
about who is at fault. The watchdog makes that bounded and explained.

How: every rank runs two daemon threads.
- The publisher writes this rank's heartbeat (last completed step, wall time, pid, host, and where
  its main thread is) to the job's rendezvous store every few seconds.
- The checker ends the process when no progress (`beat`) came for `timeout_s` (before the first
  step: STARTUP_ALLOWANCE_S, at least): it reads every
  rank's heartbeat, names the stuck rank(s) (a heartbeat that went silent: stopped, killed, or
  blocked in native code holding the GIL; else a rank that is busy outside a collective while the
  others wait, or one behind the others), dumps the Python stacks of every thread of this process
  (faulthandler), and exits with EXIT_CODE_HANG through `os._exit`: a thread cannot unwind a main
  thread blocked in C++, and the launcher then stops the remaining ranks.
The trainer calls `install(...)` once, `beat(step)` after every step and `uninstall()` at the end.
`kill -USR1 <pid>` prints the stacks of a live rank at any time.
"""
from __future__ import annotations

import datetime
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, TextIO

EXIT_CODE_HANG = 124  # like coreutils `timeout`: the job ended because something took too long
# Before the first step completes a rank may legitimately be busy for minutes (imports on a loaded
# node, first-use data preparation, model build, loading a checkpoint): it gets at least this long.
# Collectives during start-up still fail after the process-group timeout.
STARTUP_ALLOWANCE_S = 600.0
_PREFIX = "[adapt-pretrain watchdog]"
_STORE_KEY = "adapt_pretrain/watchdog/rank_{}"
_COLLECTIVE_FUNCS = {"wait", "barrier", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                     "reduce_scatter_tensor", "broadcast", "send", "recv", "all_to_all", "synchronize",
                     "monitored_barrier", "_all_gather_base", "_reduce_scatter_base", "gather", "scatter"}


@dataclass
class Heartbeat:
    """What one rank last said about itself."""

    rank: int
    step: Optional[int]       # last completed step (None: still starting up)
    time: float               # wall-clock time of this heartbeat
    progress_time: float      # wall-clock time of the last `beat`
    pid: int
    host: str
    where: list[str] = field(default_factory=list)  # innermost frames of the main thread, innermost first
    waiting: bool = False     # the main thread is inside a collective (waiting for the others)


def main_thread_location(depth: int = 4) -> tuple[list[str], bool]:
    """(innermost `depth` frames of the main thread as 'file:line in func', inside a collective?)."""
    frame = sys._current_frames().get(threading.main_thread().ident)  # noqa: SLF001 - the documented way
    if frame is None:
        return [], False
    stack = traceback.extract_stack(frame)[::-1][:depth]
    where = [f"{_short(f.filename)}:{f.lineno} in {f.name}" for f in stack]
    waiting = any(f.name in _COLLECTIVE_FUNCS or f"{os.sep}torch{os.sep}distributed{os.sep}" in f.filename
                  for f in stack)
    return where, waiting


def _short(path: str) -> str:
    """A frame's file relative to the package it belongs to (site-packages/torch/x.py -> torch/x.py)."""
    for marker in (f"site-packages{os.sep}", f"adapt_pretrain{os.sep}"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail if marker.startswith("site") else f"adapt_pretrain{os.sep}{tail}"
    return os.path.basename(path)


def stuck_ranks(beats: dict[int, Heartbeat], now: float, silent_after_s: float) -> tuple[list[int], str]:
    """Which ranks hold the job up, and why (the first rule that names any rank wins).

    1. a heartbeat silent for longer than `silent_after_s`: the rank is stopped, dead, or blocked in
       native code holding the GIL; 2. alive but busy outside a collective while others wait in one;
    3. behind: fewer completed steps than the others.
    """
    silent = [r for r, b in sorted(beats.items()) if now - b.time > silent_after_s]
    if silent:
        return silent, "heartbeat silent: stopped, killed, or blocked in native code"
    if any(b.waiting for b in beats.values()):
        busy = [r for r, b in sorted(beats.items()) if not b.waiting]
        if busy:
            return busy, "busy outside a collective while the other ranks wait in one"
    steps = {r: -1 if b.step is None else b.step for r, b in beats.items()}
    behind = [r for r in sorted(steps) if steps[r] < max(steps.values())]
    if behind:
        return behind, "behind the other ranks"
    return [], "no rank stands out: every rank waits (mismatched collectives?); see each rank's location"


class Watchdog:
    """The two threads of one rank. `store` is a torch.distributed Store (None: this rank alone)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, store: Any = None,
                 poll_s: Optional[float] = None, out: Optional[TextIO] = None,
                 startup_s: float = STARTUP_ALLOWANCE_S) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.startup_s = max(float(startup_s), self.timeout_s)
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(0.5, self.timeout_s / 10))
        self.silent_after_s = max(10.0, 4 * self.poll_s)
        self.store = store
        self.out = out or sys.stderr
        self.step: Optional[int] = None
        self.progress_time = time.time()
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ----- called by the training loop
    def beat(self, step: int) -> None:
        """Step `step` is complete: progress."""
        self.step = int(step)
        self.progress_time = time.time()
        self._last_progress = time.monotonic()

    def start(self) -> "Watchdog":
        targets = [("adapt-watchdog-check", self._check_loop)]
        if self.store is not None:
            targets.append(("adapt-watchdog-publish", self._publish_loop))
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()

    # ----- threads
    def _heartbeat(self) -> Heartbeat:
        where, waiting = main_thread_location()
        return Heartbeat(self.rank, self.step, time.time(), self.progress_time, os.getpid(), socket.gethostname(),
                         where, waiting)

    def _publish_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.store.set(_STORE_KEY.format(self.rank), json.dumps(asdict(self._heartbeat())))
            except Exception:  # noqa: BLE001 - the store host may be the stuck rank; the checker reports it
                pass

    def _check_loop(self) -> None:
        while not self._stop.wait(min(self.poll_s, 1.0)):
            idle = time.monotonic() - self._last_progress
            if idle > self.limit_s() and not self._stop.is_set():
                self._report_and_exit(idle)

    def limit_s(self) -> float:
        """How long the current phase may go without progress: start-up gets its allowance."""
        return self.timeout_s if self.step is not None else self.startup_s

    # ----- the report
    def _read_beats(self) -> tuple[dict[int, Heartbeat], list[str]]:
        """Every rank's heartbeat from the store (this rank's own fresh one always); problems as text."""
        beats = {self.rank: self._heartbeat()}
        problems: list[str] = []
        if self.store is None:
            return beats, problems
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            key = _STORE_KEY.format(rank)
            try:
                if not self.store.check([key]):
                    problems.append(f"rank {rank} never published a heartbeat (stuck since start-up, or never started)")
                    continue
                beats[rank] = Heartbeat(**json.loads(self.store.get(key)))
            except Exception as exc:  # noqa: BLE001
                problems.append(f"cannot read rank {rank}'s heartbeat from the rendezvous store ({type(exc).__name__}: "
                                f"{exc}); the process holding the store (rank 0, or the launcher's agent) may be the "
                                "stuck one")
                break
        return beats, problems

    def report(self, idle_s: float) -> str:
        """The text printed before exiting: who is stuck, where every rank is."""
        beats, problems = self._read_beats()
        now = time.time()
        stuck, why = stuck_ranks(beats, now, self.silent_after_s)
        last = "none yet (start-up)" if self.step is None else str(self.step)
        limit = f"timeout {self.timeout_s:.0f} s, train.collective_timeout_s" if self.step is not None else \
            f"start-up allowance {self.startup_s:.0f} s"
        lines = [f"{_PREFIX} rank {self.rank}: no progress for {idle_s:.1f} s ({limit}; last completed step: "
                 f"{last}). Ending this process."]
        if stuck:
            lines.append(f"{_PREFIX} stuck rank(s): {', '.join(map(str, stuck))} ({why})")
        else:
            lines.append(f"{_PREFIX} stuck rank: undetermined ({why})")
        lines += [f"{_PREFIX}   {p}" for p in problems]
        for rank, b in sorted(beats.items()):
            step = "start-up" if b.step is None else f"last step {b.step}"
            state = "waiting in a collective" if b.waiting else "running"
            where = " <- ".join(b.where[:3]) or "?"
            lines.append(f"{_PREFIX}   rank {rank} (pid {b.pid} on {b.host}): {step}, heartbeat {now - b.time:.1f} s "
                         f"ago, {state} at {where}")
        return "\n".join(lines)

    def _report_and_exit(self, idle_s: float) -> None:
        try:
            text = self.report(idle_s)
        except Exception as exc:  # noqa: BLE001 - the exit must happen whatever the report does
            text = f"{_PREFIX} rank {self.rank}: no progress for {idle_s:.1f} s; report failed: {exc!r}"
        try:
            print(text, file=self.out, flush=True)
            print(f"{_PREFIX} Python stacks of rank {self.rank} (all threads, most recent call first):",
                  file=self.out, flush=True)
            faulthandler.dump_traceback(file=self.out, all_threads=True)
            print(f"{_PREFIX} rank {self.rank} exits with code {EXIT_CODE_HANG}", file=self.out, flush=True)
            sys.stdout.flush()
        finally:
            os._exit(EXIT_CODE_HANG)


_ACTIVE: Optional[Watchdog] = None


def _store_client(master_addr: str, master_port: int, world_size: int) -> Any:
    """A second client connection to the job's rendezvous store (rank 0's, or torchrun's agent's)."""
    import torch.distributed as dist

    return dist.TCPStore(master_addr, master_port, world_size, is_master=False,
                         timeout=datetime.timedelta(seconds=10), wait_for_workers=False)


def install(rank: int, world_size: int, timeout_s: float, master_addr: str = "127.0.0.1",
            master_port: Optional[int] = None) -> Watchdog:
    """Start this rank's watchdog (after the process group exists); `beat` reaches it from anywhere."""
    global _ACTIVE
    uninstall()
    store = None
    if world_size > 1 and master_port is not None:
        try:
            store = _store_client(master_addr, master_port, world_size)
        except Exception as exc:  # noqa: BLE001 - still useful alone: it ends this rank and names it
            print(f"{_PREFIX} rank {rank}: no rendezvous store ({exc}); the report will show this rank only",
                  file=sys.stderr, flush=True)
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, ValueError, RuntimeError):  # not on this platform, or not the main thread
        pass
    _ACTIVE = Watchdog(rank, world_size, timeout_s, store).start()
    return _ACTIVE


def beat(step: int) -> None:
    """Tell the installed watchdog (if any) that `step` completed."""
    if _ACTIVE is not None:
        _ACTIVE.beat(step)


def uninstall() -> None:
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.stop()
        _ACTIVE = None


__all__ = ["EXIT_CODE_HANG", "Heartbeat", "Watchdog", "install", "beat", "uninstall", "stuck_ranks",
           "main_thread_location"]

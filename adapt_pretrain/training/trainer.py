"""`Trainer`: the training loop and its state. Every other concern is a callback (training/callbacks/):
checkpoints, the non-finite policy, metrics, console, the document table, the watchdog's heartbeat.

The loop decides only the order of things: the step (anchor refresh when due, micro-batches, megatron's
schedule with ADAPT inside) and the hooks around it. Construction lives in build.py, the choice and
loading of the start checkpoint in resume.py.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from adapt_pretrain.deepspeed.launcher import DistEnv
from adapt_pretrain.config import RunConfig
from adapt_pretrain.layout import Layout
from adapt_pretrain.monitor import NullMonitor
from adapt_pretrain.training.build import build_parts
from adapt_pretrain.training.callbacks import Callback, CallbackList, RunLog, StepLog, default_callbacks
from adapt_pretrain.checkpointing import checkpoint_root
from adapt_pretrain.training.resume import Resumer, callback_states


@dataclass
class LoopState:
    """The loop's own position; callbacks keep theirs (saved next to it, under their names)."""

    step: int = 0  # next step to run (= steps completed)


@dataclass
class StepRecord:
    """The latest step as callbacks see it: its micro-batches (this rank's) and timings."""

    step: int
    micro_batches: list[dict]
    step_s: float      # data + forward/backward + optimiser
    refresh_s: float   # anchor re-encoding before it (0 when none was due)


@dataclass
class RunResult:
    """What a finished (or stopped) run returns to the CLI and to tests."""

    steps_run: int
    final_step: int
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    anchor_refresh_times: list[float] = field(default_factory=list)
    run_dir: str = ""

    def add(self, loss: float, step_s: float, refresh_s: float) -> None:
        self.losses.append(loss)
        self.step_times.append(step_s + refresh_s)
        if refresh_s:
            self.anchor_refresh_times.append(refresh_s)
        self.steps_run += 1


class Trainer:
    """One training run on this rank. `run()` executes it; everything is built in `__init__`."""

    def __init__(self, cfg: RunConfig, env: DistEnv, resume: str | None = None, setup: bool = True,
                 allow_change: tuple[str, ...] = (), restart: bool = False,
                 callbacks: Iterable[Callback] = ()) -> None:
        """setup=False reuses the megatron layout already set up (the benchmark builds two trainers).

        resume: None (fresh start), "auto" (newest verified checkpoint of the run dir) or a directory.
        allow_change: optim.* fields that may differ from the checkpoint (`--allow-change`).
        restart: start at step 0 even if the run dir holds checkpoints (they are moved aside).
        callbacks: added to `default_callbacks(cfg)`; their state is saved and resumed with the run's.
        """
        from adapt_pretrain.megatron import parallel_info, setup_parallel

        self.cfg, self.env = cfg, env
        if setup:
            self.info = setup_parallel(cfg.parallel, cfg.train.seed, timeout_s=cfg.train.process_group_timeout_s())
        else:
            torch.manual_seed(cfg.train.seed)  # same initial weights as a fresh setup would give
            self.info = parallel_info()
        self.layout = Layout.plan(cfg.parallel, cfg.train, self.info.world_size)
        self.num_microbatches = self.layout.num_microbatches
        self.samples_per_step = self.layout.global_batch_size
        self.run_dir = cfg.train.run_dir
        self.ckpt_root = checkpoint_root(self.run_dir)
        if self.info.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
        self.callbacks = CallbackList([*default_callbacks(cfg), *callbacks])
        self.state = LoopState()
        self.last_step: StepRecord | None = None
        self.stop_reason: str | None = None
        # Cheap checks first: a refused resume fails before data and model are built.
        resumer = Resumer(cfg, self.layout.as_dict(), self.info.rank)
        plan = resumer.plan(resume, restart, allow_change)
        self.parts = build_parts(cfg, self.info, self.num_microbatches)
        self.resumed_from: str | None = None
        if plan.path:
            resumer.load(plan, self.checkpoint_parts(), self.load_loop_state_dict)
            resumer.move_newer_aside(plan.path)  # only now: a refused or failed resume changes nothing
            self.resumed_from = plan.path
            if self.info.rank == 0:
                print(f"[adapt-pretrain] resumed from {plan.path} at step {self.state.step}", flush=True)
        self.callbacks.fire("on_setup", self)
        for name, fields in resumer.events:
            self.monitor.log_event(self.state.step, name, **fields)
        self._data_iter: Iterator[dict] | None = None

    # -- the parts callbacks and tools reach -----------------------------------------------------------
    @property
    def monitor(self) -> Any:
        """The run log (metrics.jsonl and its W&B mirror), owned by the RunLog callback."""
        run_log = self.callbacks.find(RunLog)
        return run_log.monitor if run_log is not None and run_log.monitor is not None else NullMonitor()

    @property
    def step_fn(self) -> Any:
        return self.parts.step_fn

    @property
    def chunks(self) -> list:
        return self.parts.chunks

    @property
    def loader(self) -> Any:
        return self.parts.loader

    def checkpoint_parts(self) -> Any:
        """What a checkpoint holds besides the loop dict (megatron/run_state.TrainerParts)."""
        from adapt_pretrain.megatron.run_state import TrainerParts

        p = self.parts
        return TrainerParts(p.chunks, p.optimizer, p.scheduler, p.engine, p.loader, self.info)

    def loop_state_dict(self) -> dict[str, Any]:
        """The loop's position and every stateful callback's state (a checkpoint's loop.json)."""
        return {"step": self.state.step, "callbacks": self.callbacks.state_dicts()}

    def load_loop_state_dict(self, loop: dict[str, Any]) -> None:
        self.state = LoopState(step=int(loop["step"]))
        states = callback_states(loop)
        self.callbacks.load_state_dicts(states, self.info.rank)

    def request_stop(self, reason: str) -> None:
        """End the run after the current step (a callback's decision); the final checkpoint is still written."""
        self.stop_reason = reason

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        train = self.cfg.train
        end = min(train.steps, train.stop_at_step or train.steps)
        result = RunResult(steps_run=0, final_step=self.state.step, run_dir=self.run_dir)
        self.stop_reason = None
        try:
            self.callbacks.fire("on_run_start", self, self.state.step, end)
            while self.state.step < end and self.stop_reason is None:
                result.add(*self.step_once())
            self.callbacks.fire("on_run_end", self, result)
        finally:
            self.callbacks.fire("on_run_exit", self)
        result.final_step = self.state.step
        return result

    def step_once(self) -> tuple[float, float, float]:
        """Run the next step (anchor refresh first when due) and its callbacks.

        Returns (loss, step seconds, anchor-refresh seconds). Used by `run` and by the benchmark,
        which interleaves two trainers step by step.
        """
        step = self.state.step
        self.callbacks.fire("on_step_start", self, step)
        refresh_s = self._refresh_anchors(step) if self.step_fn.needs_anchor_refresh(step) else 0.0
        t0 = time.perf_counter()
        micro = self._next_micro_batches()
        out = self.step_fn(step, micro)
        self.last_step = StepRecord(step, micro, time.perf_counter() - t0, refresh_s)
        self.state.step += 1
        self.callbacks.fire("on_step_end", self, step, out)
        metrics = StepLog()
        self.callbacks.fire("add_metrics", self, step, out, metrics)
        self.callbacks.fire("log_metrics", self, step, metrics)
        self.callbacks.fire("on_step_done", self, step, out)
        return float(out.loss), self.last_step.step_s, refresh_s

    def _refresh_anchors(self, step: int) -> float:
        t0 = time.perf_counter()
        info = self.step_fn.refresh_anchors(step, self.parts.anchor_batches) or {}
        elapsed = time.perf_counter() - t0
        self.callbacks.fire("on_anchor_refresh", self, step, info, elapsed)
        return elapsed

    def _next_micro_batches(self) -> list[dict]:
        batches = []
        while len(batches) < self.num_microbatches:
            if self._data_iter is None:
                self._data_iter = iter(self.loader)
            try:
                batches.append(next(self._data_iter))
            except StopIteration:  # finite mode: one iter() is one epoch; continue with the next
                self._data_iter = None
        return batches

    def close(self) -> None:
        self.callbacks.fire("close")
        closer = getattr(self.loader, "close", None)
        if closer is not None:
            closer()

"""`adapt-pretrain train` / `python -m adapt_pretrain.train`: the run harness.

Wires the parts together and owns the loop: launcher env -> process group -> megatron layout ->
data (prepared on first use) -> model/optimiser -> AdaptEngine -> steps with anchor refresh,
non-finite handling, metrics, checkpoints and resume. Every piece of maths lives elsewhere
(core/, megatron/, data/, monitor/); this file only decides *when* things happen, so the same
loop runs under the deepspeed launcher, torchrun, SLURM or as one plain process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from adapt_pretrain import watchdog
from adapt_pretrain.checkpoint import (LATEST, CheckpointError, check_resume_compatible, committed_checkpoints,
                                       consented_changes, has_checksums, pin_checkpoint, prune_checkpoints, read_meta,
                                       rng_state, same_layout, save_checkpoint, select_checkpoint, set_aside_all,
                                       set_aside_newer, set_rng_state, step_of, verify_everywhere)
from adapt_pretrain.config import ConfigError, RunConfig, load_run_config
from adapt_pretrain.data.config import DataError, check_data_dir
from adapt_pretrain.deepspeed.launcher import DistEnv, configure_threads, init_distributed, read_dist_env, strip_local_rank
from adapt_pretrain.layout import Layout

CHECKPOINT_SUBDIR = "checkpoints"

# Exit codes of `adapt-pretrain train` (docs/TRAINING.md, "Exit codes").
EXIT_OK, EXIT_UNEXPECTED, EXIT_CONFIG, EXIT_CHECKPOINT, EXIT_NONFINITE, EXIT_DATA = 0, 1, 2, 3, 4, 5


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient: training cannot recover by skipping."""

    same_on_every_rank = True  # the skip decision is global, so every rank stops at the same step


@dataclass
class LoopState:
    """Counters of the loop that a resume must restore (beyond model/optimiser/data/ADAPT state)."""

    step: int = 0               # next step to run (= steps completed)
    consumed_samples: int = 0   # sequences consumed over all data-parallel ranks
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    tokens: int = 0             # loss-carrying tokens seen (global)


@dataclass
class RunResult:
    """What a finished (or stopped) run returns to the CLI and to tests."""

    steps_run: int
    final_step: int
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    anchor_refresh_times: list[float] = field(default_factory=list)
    run_dir: str = ""


# ----- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adapt-pretrain train",
        description="Pretrain a megatron-core GPT with optional ADAPT reweighting (adapt.enabled=true).",
        epilog="Overrides: section.key=value, e.g. train.steps=20 adapt.enabled=false parallel.pipeline=2. "
               "Launch with `deepspeed --num_gpus N --module adapt_pretrain.train --config FILE`, torchrun, "
               "or as one process. See docs/TRAINING.md.")
    p.add_argument("--config", "-c", help="YAML file, or DeepSpeed-style JSON with an \"adapt\" section")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the newest checkpoint in <run_dir>/checkpoints that verifies (or from the "
                        "given checkpoint directory); step 0 if the run dir has no checkpoints yet")
    p.add_argument("--allow-change", action="append", default=[], metavar="FIELD[,FIELD...]",
                   help="on resume, let these optim.* fields differ from the checkpoint (e.g. optim.lr,optim.min_lr "
                        "after a non-finite stop, or optim.total_steps to re-plan the LR schedule); each change "
                        "is printed and logged as a resume_override event")
    p.add_argument("--restart-from-scratch", action="store_true",
                   help="start at step 0 although the run dir holds checkpoints; they are moved to "
                        "checkpoints/superseded_<time>/, never deleted")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


# ----- data ------------------------------------------------------------------------------------------

def ensure_data(cfg: RunConfig, rank: int) -> Any:
    """Prepare the corpus into data.data_dir on first use (rank 0; others wait); return the DataConfig.

    Only when the config has a `prepare` section and the directory has no manifest yet, so a
    real pretraining corpus is never silently re-tokenised.
    """
    from adapt_pretrain.data.prepare import prepare

    if cfg.prepare is not None:
        manifest = os.path.join(cfg.prepare.out_dir, "manifest.json")
        if rank == 0 and not os.path.exists(manifest):
            print(f"[adapt-pretrain] preparing {len(cfg.prepare.inputs)} input(s) into {cfg.prepare.out_dir} "
                  "(first use)", flush=True)
            t0 = time.perf_counter()
            prepare(dataclasses.replace(cfg.prepare, overwrite=True))
            print(f"[adapt-pretrain] data prepared in {time.perf_counter() - t0:.1f}s", flush=True)
        _barrier()
    check_data_dir(cfg.data.data_dir)  # first use of the directory: a ConfigError naming data.data_dir
    return cfg.data


def fresh_start_problem(run_dir: str) -> str | None:
    """Why a fresh start (no --resume) must not run in `run_dir`: it holds checkpoints it would overwrite."""
    root = os.path.join(run_dir, CHECKPOINT_SUBDIR)
    names = committed_checkpoints(root)
    if not names and not os.path.exists(os.path.join(root, LATEST)):
        return None
    newest = f" (newest: {names[0]})" if names else ""
    return (f"train.run_dir {run_dir} already holds checkpoints{newest}; a fresh start would overwrite them. "
            "Resume with --resume, choose another train.run_dir, or pass --restart-from-scratch to start over "
            f"(the checkpoints are then moved to {root}/superseded_<time>/, not deleted).")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----- trainer ---------------------------------------------------------------------------------------

class Trainer:
    """One training run on this rank. `run()` executes it; everything is built in `__init__`."""

    def __init__(self, cfg: RunConfig, env: DistEnv, resume: str | None = None, setup: bool = True,
                 allow_change: tuple[str, ...] = (), restart: bool = False) -> None:
        """setup=False reuses the megatron layout already set up (the benchmark builds two trainers).

        resume: None (fresh start), "auto" (newest verified checkpoint of the run dir) or a directory.
        allow_change: optim.* fields that may differ from the checkpoint (`--allow-change`).
        restart: start at step 0 even if the run dir holds checkpoints (they are moved aside).
        """
        from adapt_pretrain.core.engine import AdaptEngine
        from adapt_pretrain.megatron import TrainStep, build_model, build_optimizer, parallel_info, setup_parallel

        self.cfg, self.env = cfg, env
        if setup:
            self.info = setup_parallel(cfg.parallel, cfg.train.seed, timeout_s=cfg.train.process_group_timeout_s())
        else:
            torch.manual_seed(cfg.train.seed)  # same initial weights as a fresh setup would give
            self.info = parallel_info()
        self._last_lr = 0.0
        self.layout = Layout.plan(cfg.parallel, cfg.train, self.info.world_size).as_dict()
        self.num_microbatches = self.layout["num_microbatches"]
        self.run_dir = cfg.train.run_dir
        self.ckpt_root = os.path.join(self.run_dir, CHECKPOINT_SUBDIR)
        if self.info.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
        self._pending_events: list[tuple[str, dict[str, Any]]] = []  # logged once the monitor exists
        self._prune_after_step: int | None = None  # prune once this step confirms the newest checkpoint
        self._streak_start = 0  # first step of the current non-finite streak
        # Cheap checks first: a refused resume fails before data and model are built.
        resume_from = self._choose_start(resume, restart)
        overrides = self._check_checkpoint(resume_from, allow_change) if resume_from else []
        self.data_cfg = ensure_data(cfg, self.info.rank)
        self._check_vocab()
        self.loader = self._build_loader()
        self.anchor_batches = self._anchor_batches()
        self.chunks = build_model(cfg.model, cfg.parallel)
        self.optimizer, self.scheduler = build_optimizer(self.chunks, cfg.optim)
        self.engine = AdaptEngine(cfg.adapt)
        self.step_fn = TrainStep(self.chunks, self.optimizer, self.scheduler, self.engine, cfg.model, cfg.parallel,
                                 self.num_microbatches, domains=self.domains)
        self.state = LoopState()
        self.resumed_from: str | None = None
        if resume_from:
            self._load(resume_from, overrides)
            self._move_newer_aside(resume_from)  # only now: a refused or failed resume changes nothing
        self.monitor = self._build_monitor()
        for name, fields in self._pending_events:
            self.monitor.log_event(self.state.step, name, **fields)
        self._data_iter: Iterator[dict] | None = None

    # -- construction helpers ------------------------------------------------------------------------
    def _check_vocab(self) -> None:
        from adapt_pretrain.data.manifest import Manifest

        manifest = Manifest.load(self.data_cfg.data_dir)
        self.domains = list(manifest.domains)
        self.tokenizer_path = manifest.tokenizer_path
        if manifest.vocab_size > self.cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={self.cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({manifest.vocab_size}) in {self.data_cfg.data_dir}")

    def _build_loader(self) -> Any:
        from adapt_pretrain.data.stream import DataStream

        return DataStream(self.data_cfg, dp_rank=self.info.dp_rank, dp_size=self.info.dp_size)

    def _anchor_batches(self) -> list[dict]:
        if not self.engine_needs_anchors():
            return []
        from adapt_pretrain.data.anchors import anchor_batches

        return anchor_batches(self.data_cfg.data_dir, self.cfg.model.seq_len, self.cfg.train.micro_batch_size,
                              self.info.dp_rank, self.info.dp_size, num_anchors=self.cfg.adapt.num_anchors)

    def engine_needs_anchors(self) -> bool:
        a = self.cfg.adapt  # the model is built after the anchors are read: AdaptMegatron.needs_anchors's rule
        return a.enabled and a.policy == "adapt" and a.signal == "embed"

    def _build_monitor(self) -> Any:
        from adapt_pretrain.monitor import Monitor

        # The logging rank holds the final results (last pipeline stage, TP rank 0, DP rank 0).
        rank = 0 if self.info.is_logging_rank else 1
        config = {**self.cfg.to_dict(), "layout": self.layout}
        return Monitor(self.run_dir, config, self.cfg.wandb, rank=rank, stdout=False)

    # -- checkpoints ----------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "layout": self.layout, "domains": self.domains, "state": "sharded"}

    def _parts(self) -> Any:
        from adapt_pretrain.megatron.run_state import TrainerParts

        return TrainerParts(self.chunks, self.optimizer, self.scheduler, self.engine, self.loader, self.info)

    def _write_state(self, directory: str) -> list[str]:
        """Collective: this step's whole state into `directory` (see megatron/run_state.py)."""
        from adapt_pretrain.megatron.dist_ckpt import ShardedCheckpointer
        from adapt_pretrain.megatron.run_state import save_trainer_state

        if getattr(self, "_checkpointer", None) is None:
            self._checkpointer = ShardedCheckpointer()
        return save_trainer_state(directory, self._parts(), dataclasses.asdict(self.state), rng_state(),
                                  self._checkpointer)

    def save(self) -> str:
        """Save this step's state (collective). Pruning waits until the next step confirms it is usable."""
        from adapt_pretrain.megatron.run_state import checkpoint_files

        path = save_checkpoint(self.ckpt_root, self.state.step, self._write_state, self._meta(), self.info.rank,
                               self._exchange, expected=checkpoint_files(self.info.world_size, self.info.dp_size))
        self._prune_after_step = self.state.step
        return path

    def _confirm_and_prune(self, step: int) -> None:
        """Step `step` ran with a finite loss from the checkpoint saved just before it: prune older ones.

        Deferring the prune keeps the previous checkpoint until the newest one has produced a finite
        step, so a non-finite streak that starts right after a save still finds a good one behind it.
        """
        if self._prune_after_step != step:
            return
        self._prune_after_step = None
        if self.info.rank == 0:
            prune_checkpoints(self.ckpt_root, self.cfg.train.keep_checkpoints)

    def _exchange(self, obj: Any) -> list[Any]:
        """All-gather of a small picklable object over every rank (a barrier that carries verdicts)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [obj]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def _say(self, message: str) -> None:
        if self.info.rank == 0:
            print(f"[adapt-pretrain] {message}", file=sys.stderr, flush=True)

    def _on_rank0(self, action: Any) -> Any:
        """Run a filesystem action on rank 0; every rank raises if it failed (collective)."""
        result, error = None, ""
        if self.info.rank == 0:
            try:
                result = action()
            except OSError as exc:
                error = f"rank 0: {exc}"
        errors = [e for e in self._exchange(error) if e]
        if errors:
            raise CheckpointError(f"cannot rearrange {self.ckpt_root}: {errors[0]}", same_on_every_rank=True)
        return result

    def _choose_start(self, resume: str | None, restart: bool) -> str | None:
        """The checkpoint to resume from, or None for step 0. Collective; never starts over by accident.

        A fresh start in a run dir with checkpoints, or a resume that finds checkpoints but none that
        verifies, is refused unless `restart` says to start over (the checkpoints are then moved aside).
        """
        root = self.ckpt_root
        if restart:
            moved = self._on_rank0(lambda: set_aside_all(root, "moved aside by --restart-from-scratch"))
            if moved:
                self._say(f"--restart-from-scratch: the existing checkpoints were moved to {moved} (not deleted); "
                          "starting from step 0")
            return None
        if resume is None:
            problem = self._exchange(fresh_start_problem(self.run_dir) if self.info.rank == 0 else None)[0]
            if problem:
                raise CheckpointError(problem, same_on_every_rank=True)
            return None
        if resume != "auto" and (os.path.exists(os.path.join(resume, "meta.json"))
                                 or step_of(os.path.basename(os.path.normpath(resume))) is not None):
            problems = verify_everywhere(resume, self.info.rank, self._exchange)
            if problems:
                raise CheckpointError(f"--resume {resume}: this checkpoint cannot be loaded:\n  " + "\n  ".join(problems)
                                      + "\nNothing was changed.", same_on_every_rank=True)
            return resume
        return self._newest_verified(root if resume == "auto" else resume)

    def _newest_verified(self, root: str) -> str | None:
        selection = select_checkpoint(root, self.info.rank, self._exchange)
        if selection.path is None:
            if selection.holds_checkpoints:
                raise CheckpointError(
                    f"--resume: no checkpoint in {root} can be loaded:\n{selection.describe_rejected()}"
                    + "".join(f"\n  ({note})" for note in selection.notes)
                    + "\nNothing was changed. Restore a checkpoint, resume a specific one with --resume DIR, or pass "
                      f"--restart-from-scratch to start over from step 0 (the checkpoints are then moved to "
                      f"{root}/superseded_<time>/, not deleted).", same_on_every_rank=True)
            self._say(f"--resume: no checkpoint in {root} yet; starting from step 0")
            return None
        for note in selection.notes:
            self._say(note)
        if selection.rejected:
            self._say(f"--resume: newer checkpoints cannot be loaded:\n{selection.describe_rejected()}\n"
                      f"falling back to {os.path.basename(selection.path)}")
            self._pending_events.append(("checkpoint_fallback", {
                "resumed": os.path.basename(selection.path),
                "rejected": {name: reasons for name, reasons in selection.rejected}}))
        return selection.path

    def _move_newer_aside(self, path: str) -> None:
        """Checkpoints of this run dir newer than the one resumed (damaged ones, or a rolled-back timeline)
        would be overwritten by the next saves: move them aside, never delete them."""
        step = step_of(os.path.basename(os.path.normpath(path)))
        if step is None:
            return
        why = f"newer than {os.path.basename(path)}, from which the run was resumed (damaged, or a rollback)"
        newer, dest = self._on_rank0(lambda: set_aside_newer(self.ckpt_root, step, why)) or ([], None)
        if dest:
            self._say(f"moved {', '.join(newer)} (newer than the resumed checkpoint) to {dest}; not deleted")

    def _check_checkpoint(self, path: str, allow_change: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
        """Compare the checkpoint's config with this run's; returns the changes `--allow-change` lets through."""
        try:
            meta = read_meta(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}/meta.json: {exc}", same_on_every_rank=True) from None
        self._require_sharded(path)
        if not has_checksums(path):
            self._say(f"{path} predates checksums (format 1): loading it unverified")
        self._keep_schedule_horizon(meta.get("config", {}), allow_change)
        check_resume_compatible(meta, self.cfg.to_dict(), self.layout, allow_change)
        changes = consented_changes(meta.get("config", {}), self.cfg.to_dict(), allow_change)
        for key, old, new in changes:
            self._say(f"--allow-change: {key} {old!r} (checkpoint) -> {new!r} (now)")
            self._pending_events.append(("resume_override", {"field": key, "checkpoint": old, "now": new}))
        return changes

    def _keep_schedule_horizon(self, saved: dict[str, Any], allow_change: tuple[str, ...]) -> None:
        """Extending train.steps on resume keeps the checkpoint's LR horizon unless the user re-plans it.

        optim.total_steps copies train.steps when not given, so a longer run would otherwise look like a
        changed schedule. Keeping the horizon changes nothing already computed; the LR stays at min_lr
        past it. `--allow-change optim.total_steps` re-plans instead (a logged override).
        """
        saved_total = (saved.get("optim") or {}).get("total_steps")
        optim = self.cfg.optim
        if (not self.cfg.total_steps_derived or not isinstance(saved_total, int) or saved_total == optim.total_steps
                or any(f in ("optim.total_steps", "optim.", "optim.*") for f in allow_change)):
            return
        self.cfg.optim = dataclasses.replace(optim, total_steps=saved_total)
        self._say(f"train.steps={self.cfg.train.steps}: keeping the checkpoint's LR schedule horizon of {saved_total} "
                  f"steps (the LR stays at optim.min_lr={optim.min_lr} after step {saved_total}); to re-plan the "
                  f"schedule for {self.cfg.train.steps} steps instead, resume with --allow-change optim.total_steps")
        self._pending_events.append(("lr_schedule_kept", {"total_steps": saved_total,
                                                          "train_steps": self.cfg.train.steps}))

    def _load(self, path: str, overrides: list[tuple[str, Any, Any]]) -> None:
        """Load this rank's state from a verified checkpoint; all ranks fail together if any rank fails."""
        failure: Exception | None = None
        try:
            from adapt_pretrain.megatron.run_state import load_trainer_state

            saved_layout = read_meta(path).get("layout", {})
            loop, rng = load_trainer_state(path, self._parts(), same_layout(saved_layout, self.layout))
            if rng is not None:
                set_rng_state(rng)
            else:
                self._say(f"resuming with another layout ({saved_layout} -> {self.layout}): model and optimiser "
                          "resharded, data stream redistributed, RNG streams from the seed")
            self.state = LoopState(**loop)
        except (DataError, CheckpointError) as exc:
            failure = exc
        except (KeyError, TypeError, ValueError, RuntimeError, OSError, EOFError) as exc:
            failure = CheckpointError(
                f"cannot load {path}: it was written by an incompatible version of the trainer or its parts "
                f"({type(exc).__name__}: {exc}). Start a new run_dir, or resume with the version that wrote it.")
        failed = [r for r, bad in enumerate(self._exchange(failure is not None)) if bad]
        if failure is not None:
            raise failure  # printed by this rank, with its rank
        if failed:
            raise CheckpointError(f"rank(s) {failed} could not load {path} (see their messages); stopping",
                                  same_on_every_rank=True)
        if any(key.startswith("optim.") for key, _, _ in overrides):
            self._apply_optim_config()
        self.resumed_from = path
        self._pending_events.append(("resume", {"checkpoint": path}))
        if self.info.rank == 0:
            print(f"[adapt-pretrain] resumed from {path} at step {self.state.step}", flush=True)

    def _apply_optim_config(self) -> None:
        """Make the loaded optimiser and LR schedule follow the current optim.* (after --allow-change).

        Loading restores the checkpoint's schedule (megatron's scheduler and param groups carry their
        own lr, min_lr, horizon), so the allowed changes are written into them and the LR recomputed.
        """
        optim, scheduler = self.cfg.optim, self.scheduler
        scheduler.init_lr = 0.0 if optim.warmup_steps > 0 else optim.lr
        scheduler.max_lr, scheduler.min_lr = float(optim.lr), float(optim.min_lr)
        scheduler.lr_warmup_steps, scheduler.lr_decay_steps = optim.warmup_steps, optim.total_steps
        scheduler.lr_decay_style = optim.lr_decay_style
        scheduler.start_wd = scheduler.end_wd = optim.weight_decay
        scheduler.wd_incr_steps = optim.total_steps
        for group in self.optimizer.param_groups:
            group["betas"], group["eps"] = tuple(optim.betas), optim.eps
            if "max_lr" in group:
                group["max_lr"], group["min_lr"] = float(optim.lr), float(optim.min_lr)
        scheduler.step(increment=0)  # the current step's lr and weight decay under the new settings

    @staticmethod
    def _require_sharded(path: str) -> None:
        from adapt_pretrain.megatron.dist_ckpt import is_sharded_checkpoint, sharded_dir

        if not is_sharded_checkpoint(sharded_dir(path)):
            raise CheckpointError(
                f"{path} is a legacy checkpoint (one rank_NNNNN.pt per rank, written before sharded checkpoints); "
                "this version resumes sharded checkpoints only. Resume it with the version that wrote it, or start a "
                "new run_dir; `adapt-pretrain eval` and `export` still read it if it was written with TP = PP = 1.",
                same_on_every_rank=True)

    # -- the loop -------------------------------------------------------------------------------------
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

    def _refresh_anchors(self, step: int) -> float:
        t0 = time.perf_counter()
        info = self.step_fn.refresh_anchors(step, self.anchor_batches) or {}
        elapsed = time.perf_counter() - t0
        fields = {k: v for k, v in info.items() if k != "step"}
        fields.setdefault("refresh_time_s", elapsed)
        self.monitor.log_event(step, "anchor_refresh", **fields)
        return elapsed

    def step_once(self) -> tuple[float, float, float]:
        """Run the next step (anchor refresh first when due), log it, update counters.

        Returns (loss, step seconds, anchor-refresh seconds). Used by `run` and by the benchmark,
        which interleaves two trainers step by step.
        """
        step = self.state.step
        refresh_s = 0.0
        if self.step_fn.needs_anchor_refresh(step):
            refresh_s = self._refresh_anchors(step)
        t0 = time.perf_counter()
        micro = self._next_micro_batches()
        self._last_micro = micro
        out = self.step_fn(step, micro)
        step_s = time.perf_counter() - t0
        loss = float(out.loss)
        self._handle_nonfinite(step, out, loss)
        self.state.step += 1
        self.state.consumed_samples += self.layout["dp"] * self.num_microbatches * self.cfg.train.micro_batch_size
        self.state.tokens += int(out.num_tokens or 0)
        self._log_step(step, out, loss, step_s, refresh_s)
        self._last_lr = float(out.lr)
        return loss, step_s, refresh_s

    def run(self) -> RunResult:
        cfg = self.cfg.train
        end = min(cfg.steps, cfg.stop_at_step or cfg.steps)
        result = RunResult(steps_run=0, final_step=self.state.step, run_dir=self.run_dir)
        if self.state.step >= end:
            self._say(f"nothing to run: the run is at step {self.state.step} and train.steps / train.stop_at_step "
                      f"end it at {end}")
        bar = self._progress_bar(self.state.step, end)
        saved_at = -1
        try:
            while self.state.step < end:
                loss, step_s, refresh_s = self.step_once()
                watchdog.beat(self.state.step)
                result.losses.append(loss)
                result.step_times.append(step_s + refresh_s)
                if refresh_s:
                    result.anchor_refresh_times.append(refresh_s)
                result.steps_run += 1
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self._last_lr:.2e}", refresh=False)
                    bar.update(1)
                if cfg.checkpoint_interval and self.state.step % cfg.checkpoint_interval == 0:
                    saved_at = self._save_unless_nonfinite()
            if self.state.nonfinite_in_row:
                self._stop_nonfinite(self.state.step - 1, f"the run ended at step {self.state.step} during "
                                     f"{self.state.nonfinite_in_row} consecutive non-finite steps")
            if result.steps_run and saved_at != self.state.step:
                self.save()  # the final state, so the run can be evaluated or continued
        finally:
            if bar is not None:
                bar.close()
        result.final_step = self.state.step
        return result

    def _save_unless_nonfinite(self) -> int:
        """Save now unless the latest steps were skipped as non-finite (their state must not be kept)."""
        if self.state.nonfinite_in_row:
            self._say(f"step {self.state.step}: checkpoint not written ({self.state.nonfinite_in_row} non-finite "
                      "step(s) in a row)")
            self.monitor.log_event(self.state.step, "checkpoint_skipped_nonfinite", in_row=self.state.nonfinite_in_row)
            return -1
        self.save()
        return self.state.step

    def _progress_bar(self, start: int, end: int) -> Any:
        if not (self.cfg.train.progress_bar and self.info.is_logging_rank):
            return None
        from tqdm import tqdm

        return tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    def _handle_nonfinite(self, step: int, out: Any, loss: float) -> None:
        bad = bool(out.skipped) or not math.isfinite(loss)
        if not bad:
            self.state.nonfinite_in_row = 0
            self._confirm_and_prune(step)
            return
        self.state.nonfinite_in_row += 1
        self.state.skipped_steps += 1
        self.monitor.log_event(step, "nonfinite_step_skipped", loss=loss, in_row=self.state.nonfinite_in_row)
        if self.info.is_logging_rank:
            print(f"[adapt-pretrain] step {step}: non-finite loss/gradient ({loss}); update skipped "
                  f"({self.state.nonfinite_in_row} in a row)", file=sys.stderr, flush=True)
        if self.state.nonfinite_in_row == 1:
            self._pin_before_streak(step)
        limit = self.cfg.train.max_nonfinite_in_row
        if self.state.nonfinite_in_row >= limit:
            self._stop_nonfinite(step, f"{limit} consecutive steps had a non-finite loss or gradient "
                                       f"(train.max_nonfinite_in_row={limit})")

    def _last_good_checkpoint(self, first_bad_step: int) -> str | None:
        """The newest checkpoint written before step `first_bad_step` ran. Its successor (if any) holds the
        weights that produced the first non-finite loss, so it is suspect."""
        older = [n for n in committed_checkpoints(self.ckpt_root) if (step_of(n) or 0) < first_bad_step]
        return older[0] if older else None

    def _pin_before_streak(self, step: int) -> None:
        """A streak begins at `step`: protect the last checkpoint before it from pruning, for good."""
        self._streak_start = step
        good = self._last_good_checkpoint(step)
        if good is None:
            return
        why = f"last checkpoint before the non-finite streak that began at step {step}"
        self._on_rank0(lambda: pin_checkpoint(self.ckpt_root, good, why))
        self.monitor.log_event(step, "checkpoint_pinned", checkpoint=good, reason=why)

    def _stop_nonfinite(self, step: int, what: str) -> None:
        """Stop with a message that says exactly how to continue; checkpoints written after the last good
        one are moved aside so a plain `--resume` cannot pick their state either."""
        start = self._streak_start if self.state.nonfinite_in_row else step
        good = self._last_good_checkpoint(start)
        why = f"written after step {start - 1}; step {start} went non-finite from this state"
        suspect, dest = self._on_rank0(lambda: set_aside_newer(self.ckpt_root, step_of(good) if good else -1, why)) \
            or ([], None)
        moved = f" Checkpoints written after the last good step ({', '.join(suspect)}) were moved to {dest}." \
            if dest else ""
        optim = self.cfg.optim
        lower = [f"optim.lr={optim.lr / 10:g}"] + ([f"optim.min_lr={optim.min_lr / 10:g}"] if optim.min_lr else [])
        fields = ",".join(arg.split("=")[0] for arg in lower)
        if good:
            path = os.path.join(self.ckpt_root, good)
            how = (f"To continue from {path}, the last checkpoint before the streak (pinned: never pruned), with a "
                   f"lower learning rate, run your launch command again with these arguments added:\n"
                   f"  --resume {path} --allow-change {fields} {' '.join(lower)}\n")
        else:
            how = ("No checkpoint from before the streak exists. To start over with a lower learning rate, run your "
                   f"launch command again with these arguments added:\n  --restart-from-scratch {' '.join(lower)}\n")
        raise NonFiniteLossError(
            f"stopping at step {step}: {what}; no checkpoint was written from them.{moved}\n{how}"
            "Other remedies: raise optim.warmup_steps, lower optim.clip_grad, check the data.")

    def _log_step(self, step: int, out: Any, loss: float, step_s: float, refresh_s: float) -> None:
        scalars: dict[str, float] = {
            "loss": loss, "lr": float(out.lr), "train/step_time_s": step_s, "train/anchor_refresh_s": refresh_s,
            "train/tokens_per_s": float(out.num_tokens or 0) / max(step_s, 1e-9),
            "train/skipped_steps": self.state.skipped_steps, "train/tokens": self.state.tokens,
            "train/consumed_samples": self.state.consumed_samples,
        }
        if out.grad_norm is not None and math.isfinite(float(out.grad_norm)):
            scalars["grad_norm"] = float(out.grad_norm)
        histograms, tables = {}, {}
        if out.groups is not None and self.info.is_logging_rank:  # the global batch's groups (last stage)
            g = out.groups
            metrics = self.step_fn.adapt.metrics(g)  # already global: gathered over DP by the step
            scalars.update(metrics.scalars)
            if self.monitor.histogram_due(step):
                histograms = metrics.histograms
            if self.monitor.table_due(step):
                tables = {"extreme_documents": self._extreme_rows(g)}
        scalars.update(self._data_stats())
        self.monitor.log_step(step, scalars, histograms or None, tables or None)
        if self.info.is_logging_rank and (step % self.cfg.train.log_interval == 0 or step + 1 == self.cfg.train.steps):
            line = " ".join(f"{k}={v:.4g}" for k, v in scalars.items()
                            if k in ("loss", "lr", "grad_norm", "train/tokens_per_s", "adapt/weight_mean",
                                     "adapt/weight_std"))
            message = f"[step {step}] {line}"
            if self.cfg.train.progress_bar:
                from tqdm import tqdm

                tqdm.write(message, file=sys.stderr)
            else:
                print(message, flush=True)

    def _data_stats(self) -> dict[str, float]:
        """The loader's counters (skipped samples by kind, micro-batches, tokens) summed over DP ranks.

        Collective over the data-parallel group: every rank calls it every step.
        """
        stats = self.loader.stats()
        keys = sorted(k for k in stats if k != "epoch")
        values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
        if self.info.dp_size > 1:
            from megatron.core import parallel_state as ps

            values = values.to(self.info.device)  # NCCL reduces device tensors only
            dist.all_reduce(values, group=ps.get_data_parallel_group())
        out = {f"data/{k}": float(v) for k, v in zip(keys, values.tolist())}
        out["data/epoch"] = float(stats.get("epoch", 0))
        return out

    def _extreme_rows(self, groups: dict[str, torch.Tensor], k: int = 5) -> list[dict[str, Any]]:
        """The k highest- and lowest-weighted documents of this step (a W&B/local table).

        Picked among the logging rank's own groups (its 1/DP share of the global batch, the first
        rows of the DP gather), whose tokens it holds, so every row carries a text snippet.
        """
        local = sum(int(mb["num_groups"]) for mb in self._last_micro)
        weights = groups["weights"].float()[:local]
        order = torch.argsort(weights, descending=True, stable=True).tolist()
        picks = order[:k] + [i for i in order[-k:] if i not in order[:k]]
        rows = []
        for i in picks:
            domain = int(groups["group_domain"][i])
            rows.append({"domain": self.domains[domain] if 0 <= domain < len(self.domains) else str(domain),
                         "doc_id": int(groups["group_doc_id"][i]), "weight": float(weights[i]),
                         "score": float(groups["scores"][i]), "tokens": float(groups["group_tokens"][i]),
                         "snippet": self._snippet(i)})
        return rows

    def _snippet(self, index: int, max_tokens: int = 24) -> str:
        """Decoded first tokens of the index-th local group (groups are numbered per micro-batch)."""
        for mb in self._last_micro:
            if index < int(mb["num_groups"]):
                ids = mb["tokens"].reshape(-1)[mb["group_id"].reshape(-1) == index][:max_tokens]
                return self._tokenizer().decode(ids.tolist()).replace("\n", " ").strip()
            index -= int(mb["num_groups"])
        return ""

    def _tokenizer(self) -> Any:
        if getattr(self, "_tok", None) is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(self.tokenizer_path)
        return self._tok

    def close(self) -> None:
        self.monitor.close()
        closer = getattr(self.loader, "close", None)
        if closer is not None:
            closer()


# ----- entry ----------------------------------------------------------------------------------------

def _quiet_known_warnings() -> None:
    """Megatron warns on import that Apex/Transformer Engine are absent (expected: it falls back to torch)."""
    import warnings

    for pattern in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                    ".*full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def _allowed_changes(args: argparse.Namespace, cfg: RunConfig) -> tuple[str, ...]:
    """The fields of `--allow-change` (comma lists, repeatable), checked against the config."""
    from adapt_pretrain.checkpoint import consent_problems

    fields = tuple(f.strip() for group in args.allow_change for f in group.split(",") if f.strip())
    if fields and args.resume is None:
        raise ConfigError("--allow-change only applies to a resume (add --resume)")
    bad = consent_problems(fields)
    if bad:
        raise ConfigError(f"--allow-change {', '.join(bad)}: only optim.* fields may change on resume with consent "
                          "(other changes alter what the saved state means; start a new run_dir for those)")
    known = set(dataclasses.asdict(cfg.optim))
    unknown = [f for f in fields if f.rstrip("*").rstrip(".") != "optim" and f.split(".", 1)[1] not in known]
    if unknown:
        raise ConfigError(f"--allow-change {', '.join(unknown)}: unknown field(s); optim has {', '.join(sorted(known))}")
    return fields


def _report(exc: BaseException, rank: int, unexpected: bool = False) -> None:
    """Print a failure on the console with its rank. Verdicts every rank reached alike print once (rank 0)."""
    if not unexpected and getattr(exc, "same_on_every_rank", isinstance(exc, ConfigError)) and rank != 0:
        return
    if unexpected:
        import traceback

        lines = traceback.format_exception(exc)
        text = f"unexpected {type(exc).__name__}: {exc}\n" + "".join(f"[rank {rank}] {line}" for chunk in lines
                                                                      for line in chunk.splitlines(keepends=True))
    else:
        text = str(exc)
    print(f"adapt-pretrain train (rank {rank}): {text}", file=sys.stderr, flush=True)


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, CheckpointError):
        return EXIT_CHECKPOINT
    if isinstance(exc, NonFiniteLossError):
        return EXIT_NONFINITE
    if isinstance(exc, DataError):
        return EXIT_DATA
    return EXIT_UNEXPECTED


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_known_warnings()
    argv, local_rank = strip_local_rank(argv)  # deepspeed appends --local_rank=N
    args = build_parser().parse_intermixed_args(argv)  # overrides may follow options (e.g. appended ones)
    if args.resume not in (None, "auto") and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.insert(0, args.resume)  # `--resume train.steps=9`: an override, not a path
        args.resume = "auto"
    env = read_dist_env(local_rank)
    configure_threads(env)
    try:
        cfg = load_run_config(args.config, args.overrides)
        Layout.plan(cfg.parallel, cfg.train, env.world_size)
        allow_change = _allowed_changes(args, cfg)
    except ConfigError as exc:
        if env.rank == 0:
            print(f"adapt-pretrain train: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        if env.rank == 0:
            print(json.dumps(cfg.to_dict(), indent=2, default=str))
        return EXIT_OK
    problem = None if args.resume or args.restart_from_scratch else fresh_start_problem(cfg.train.run_dir)
    if problem:  # refused in the first seconds, before the process group and megatron exist
        if env.rank == 0:
            print(f"adapt-pretrain train (rank 0): {problem}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT
    init_distributed(env, timeout_s=cfg.train.process_group_timeout_s())
    if cfg.train.watchdog:
        watchdog.install(env.rank, env.world_size, cfg.train.collective_timeout_s, env.master_addr, env.master_port)
    trainer = None
    try:
        trainer = Trainer(cfg, env, resume=args.resume, allow_change=allow_change, restart=args.restart_from_scratch)
        t0 = time.perf_counter()
        result = trainer.run()
        if trainer.info.is_logging_rank:
            print(f"[adapt-pretrain] done: {result.steps_run} steps in {time.perf_counter() - t0:.1f}s, "
                  f"final loss {result.losses[-1] if result.losses else float('nan'):.4f}, run dir {cfg.train.run_dir}",
                  flush=True)
        return EXIT_OK
    except (ConfigError, CheckpointError, NonFiniteLossError, DataError) as exc:
        _report(exc, env.rank)
        return _exit_code(exc)
    except Exception as exc:  # a bug or an environment failure: every rank shows its own, with its rank
        _report(exc, env.rank, unexpected=True)
        return EXIT_UNEXPECTED
    finally:
        if trainer is not None:
            trainer.close()
        from adapt_pretrain.megatron import teardown_parallel

        teardown_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        watchdog.uninstall()


if __name__ == "__main__":
    raise SystemExit(main())

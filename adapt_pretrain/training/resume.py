"""Where a run starts: the checkpoint to resume (or step 0), its compatibility with this run, loading it.

Cheap checks come first (`Resumer.plan`, before data and model are built) so a refused resume fails in
seconds and changes nothing; the checkpoint is loaded into the built parts afterwards (`Resumer.load`),
and only then are newer checkpoints moved aside. Every method is collective (all ranks call it).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from adapt_pretrain.checkpointing import (LATEST, CheckpointError, check_resume_compatible, checkpoint_root,
                                       committed_checkpoints,
                                       consented_changes, has_checksums, read_meta, same_layout, select_checkpoint,
                                       set_aside_all, set_aside_newer, set_rng_state, step_of, verify_everywhere)
from adapt_pretrain.data.config import DataError
from adapt_pretrain.config import RunConfig
from adapt_pretrain.training.collective import exchange, on_rank0, say


def fresh_start_problem(run_dir: str) -> str | None:
    """Why a fresh start (no --resume) must not run in `run_dir`: it holds checkpoints it would overwrite."""
    root = checkpoint_root(run_dir)
    names = committed_checkpoints(root)
    if not names and not os.path.exists(os.path.join(root, LATEST)):
        return None
    newest = f" (newest: {names[0]})" if names else ""
    return (f"train.run_dir {run_dir} already holds checkpoints{newest}; a fresh start would overwrite them. "
            "Resume with --resume, choose another train.run_dir, or pass --restart-from-scratch to start over "
            f"(the checkpoints are then moved to {root}/superseded_<time>/, not deleted).")


@dataclass
class ResumePlan:
    """The checkpoint to start from (None: step 0) and the optim.* changes `--allow-change` let through."""

    path: str | None = None
    overrides: list[tuple[str, Any, Any]] = field(default_factory=list)


class Resumer:
    """Chooses, checks and loads the start checkpoint of a run dir on this rank.

    `events` collects what the monitor logs once it exists (fallbacks, overrides, the resume itself).
    """

    def __init__(self, cfg: RunConfig, layout: dict[str, Any], rank: int) -> None:
        self.cfg, self.layout, self.rank = cfg, layout, rank
        self.run_dir = cfg.train.run_dir
        self.root = checkpoint_root(self.run_dir)
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _say(self, message: str) -> None:
        say(self.rank, message)

    def plan(self, resume: str | None, restart: bool, allow_change: tuple[str, ...]) -> ResumePlan:
        """resume: None (fresh start), "auto" (newest verified checkpoint) or a directory.

        May lower the run's LR horizon to the checkpoint's (`keep_schedule_horizon`), so call it
        before the optimiser is built.
        """
        path = self._choose_start(resume, restart)
        return ResumePlan(path, self._check_checkpoint(path, allow_change) if path else [])

    # -- choosing --------------------------------------------------------------------------------------
    def _choose_start(self, resume: str | None, restart: bool) -> str | None:
        """The checkpoint to resume from, or None for step 0. Never starts over by accident.

        A fresh start in a run dir with checkpoints, or a resume that finds checkpoints but none that
        verifies, is refused unless `restart` says to start over (the checkpoints are then moved aside).
        """
        root = self.root
        if restart:
            moved = on_rank0(self.rank, lambda: set_aside_all(root, "moved aside by --restart-from-scratch"), root)
            if moved:
                self._say(f"--restart-from-scratch: the existing checkpoints were moved to {moved} (not deleted); "
                          "starting from step 0")
            return None
        if resume is None:
            problem = exchange(fresh_start_problem(self.run_dir) if self.rank == 0 else None)[0]
            if problem:
                raise CheckpointError(problem, same_on_every_rank=True)
            return None
        if resume != "auto" and (os.path.exists(os.path.join(resume, "meta.json"))
                                 or step_of(os.path.basename(os.path.normpath(resume))) is not None):
            problems = verify_everywhere(resume, self.rank, exchange)
            if problems:
                raise CheckpointError(f"--resume {resume}: this checkpoint cannot be loaded:\n  " + "\n  ".join(problems)
                                      + "\nNothing was changed.", same_on_every_rank=True)
            return resume
        return self._newest_verified(root if resume == "auto" else resume)

    def _newest_verified(self, root: str) -> str | None:
        selection = select_checkpoint(root, self.rank, exchange)
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
            self.events.append(("checkpoint_fallback", {
                "resumed": os.path.basename(selection.path),
                "rejected": {name: reasons for name, reasons in selection.rejected}}))
        return selection.path

    # -- compatibility ---------------------------------------------------------------------------------
    def _check_checkpoint(self, path: str, allow_change: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
        """Compare the checkpoint's config with this run's; returns the changes `--allow-change` lets through."""
        try:
            meta = read_meta(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}/meta.json: {exc}", same_on_every_rank=True) from None
        require_sharded(path)
        if not has_checksums(path):
            self._say(f"{path} predates checksums (format 1): loading it unverified")
        self._keep_schedule_horizon(meta.get("config", {}), allow_change)
        check_resume_compatible(meta, self.cfg.to_dict(), self.layout, allow_change)
        changes = consented_changes(meta.get("config", {}), self.cfg.to_dict(), allow_change)
        for key, old, new in changes:
            self._say(f"--allow-change: {key} {old!r} (checkpoint) -> {new!r} (now)")
            self.events.append(("resume_override", {"field": key, "checkpoint": old, "now": new}))
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
        self.events.append(("lr_schedule_kept", {"total_steps": saved_total, "train_steps": self.cfg.train.steps}))

    # -- loading ---------------------------------------------------------------------------------------
    def load(self, plan: ResumePlan, parts: Any, restore_loop: Callable[[dict[str, Any]], None]) -> None:
        """Load this rank's state from the planned checkpoint into `parts` (megatron/run_state.TrainerParts)
        and hand the saved loop dict to `restore_loop`. All ranks fail together if any rank fails."""
        path = plan.path
        failure: Exception | None = None
        try:
            from adapt_pretrain.megatron.run_state import load_trainer_state

            saved_layout = read_meta(path).get("layout", {})
            loop, rng = load_trainer_state(path, parts, same_layout(saved_layout, self.layout))
            if rng is not None:
                set_rng_state(rng)
            else:
                self._say(f"resuming with another layout ({saved_layout} -> {self.layout}): model and optimiser "
                          "resharded, data stream redistributed, RNG streams from the seed")
            restore_loop(loop)
        except (DataError, CheckpointError) as exc:
            failure = exc
        except (KeyError, TypeError, ValueError, RuntimeError, OSError, EOFError) as exc:
            failure = CheckpointError(
                f"cannot load {path}: it was written by an incompatible version of the trainer or its parts "
                f"({type(exc).__name__}: {exc}). Start a new run_dir, or resume with the version that wrote it.")
        failed = [r for r, bad in enumerate(exchange(failure is not None)) if bad]
        if failure is not None:
            raise failure  # printed by this rank, with its rank
        if failed:
            raise CheckpointError(f"rank(s) {failed} could not load {path} (see their messages); stopping",
                                  same_on_every_rank=True)
        if any(key.startswith("optim.") for key, _, _ in plan.overrides):
            from adapt_pretrain.megatron.optim import apply_optim_config

            apply_optim_config(self.cfg.optim, parts.optimizer, parts.scheduler)
        self.events.append(("resume", {"checkpoint": path}))

    def move_newer_aside(self, path: str) -> None:
        """Checkpoints of this run dir newer than the one resumed (damaged ones, or a rolled-back timeline)
        would be overwritten by the next saves: move them aside, never delete them. Call it only after a
        successful load: a refused or failed resume changes nothing."""
        step = step_of(os.path.basename(os.path.normpath(path)))
        if step is None:
            return
        why = f"newer than {os.path.basename(path)}, from which the run was resumed (damaged, or a rollback)"
        newer, dest = on_rank0(self.rank, lambda: set_aside_newer(self.root, step, why), self.root) or ([], None)
        if dest:
            self._say(f"moved {', '.join(newer)} (newer than the resumed checkpoint) to {dest}; not deleted")


def require_sharded(path: str) -> None:
    from adapt_pretrain.megatron.dist_ckpt import is_sharded_checkpoint, sharded_dir

    if not is_sharded_checkpoint(sharded_dir(path)):
        raise CheckpointError(
            f"{path} is a legacy checkpoint (one rank_NNNNN.pt per rank, written before sharded checkpoints); "
            "this version resumes sharded checkpoints only. Resume it with the version that wrote it, or start a "
            "new run_dir; `adapt-pretrain eval` and `export` still read it if it was written with TP = PP = 1.",
            same_on_every_rank=True)


def callback_states(loop: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The callbacks' saved states from a checkpoint's loop.json; one written before callbacks kept flat
    counters next to the step, which map onto the metrics callback and the non-finite policy."""
    if "callbacks" in loop:
        return loop["callbacks"]
    return {"metrics": {k: loop[k] for k in ("consumed_samples", "tokens", "skipped_steps")},
            "nonfinite": {"in_row": loop["nonfinite_in_row"], "streak_start": 0}}

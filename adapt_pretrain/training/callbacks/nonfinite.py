"""The non-finite policy: count streaks of skipped steps, pin the last good checkpoint, stop with the
exact command that continues (`NonFiniteLossError`, exit code 4).

The step engine already skips the update of a non-finite step (the same decision on every rank);
this callback decides when skipping no longer helps.
"""
from __future__ import annotations

import math
import os
from typing import Any

from adapt_pretrain.checkpointing import committed_checkpoints, pin_checkpoint, set_aside_newer, step_of
from adapt_pretrain.logs import get_logger
from adapt_pretrain.training.callbacks.base import Callback
from adapt_pretrain.training.collective import on_rank0

log = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient: training cannot recover by skipping."""

    same_on_every_rank = True  # the skip decision is global, so every rank stops at the same step


def went_nonfinite(out: Any) -> bool:
    """Whether a step's update was skipped for a non-finite loss or gradient (same answer on every rank)."""
    return bool(out.skipped) or not math.isfinite(float(out.loss))


class NonFinitePolicy(Callback):
    """Stops after `max_in_row` consecutive non-finite steps, or when the run ends inside a streak."""

    name = "nonfinite"
    order = -100  # before anything logs or saves the step

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.in_row = 0         # consecutive non-finite steps up to the latest one
        self.streak_start = 0   # first step of the current streak

    def on_step_end(self, trainer: Any, step: int, out: Any) -> None:
        if not went_nonfinite(out):
            self.in_row = 0
            return
        self.in_row += 1
        loss = float(out.loss)
        trainer.monitor.log_event(step, "nonfinite_step_skipped", loss=loss, in_row=self.in_row)
        if trainer.info.is_logging_rank:
            log.warning(f"step {step}: non-finite loss/gradient ({loss}); update skipped ({self.in_row} in a row)")
        if self.in_row == 1:
            self.streak_start = step
            self._pin_before_streak(trainer, step)
        if self.in_row >= self.max_in_row:
            self._stop(trainer, step, f"{self.max_in_row} consecutive steps had a non-finite loss or gradient "
                                      f"(train.max_nonfinite_in_row={self.max_in_row})")

    def on_run_end(self, trainer: Any, result: Any) -> None:
        if self.in_row:
            step = trainer.state.step
            self._stop(trainer, step - 1, f"the run ended at step {step} during {self.in_row} consecutive "
                                          "non-finite steps")

    def state_dict(self) -> dict[str, Any]:
        return {"in_row": self.in_row, "streak_start": self.streak_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.in_row, self.streak_start = int(state["in_row"]), int(state["streak_start"])

    # -- pinning and stopping --------------------------------------------------------------------------
    @staticmethod
    def _last_good_checkpoint(root: str, first_bad_step: int) -> str | None:
        """The newest checkpoint written before step `first_bad_step` ran. Its successor (if any) holds the
        weights that produced the first non-finite loss, so it is suspect."""
        older = [n for n in committed_checkpoints(root) if (step_of(n) or 0) < first_bad_step]
        return older[0] if older else None

    def _pin_before_streak(self, trainer: Any, step: int) -> None:
        """A streak begins at `step`: protect the last checkpoint before it from pruning, for good."""
        root = trainer.ckpt_root
        good = self._last_good_checkpoint(root, step)
        if good is None:
            return
        why = f"last checkpoint before the non-finite streak that began at step {step}"
        on_rank0(trainer.info.rank, lambda: pin_checkpoint(root, good, why), root)
        trainer.monitor.log_event(step, "checkpoint_pinned", checkpoint=good, reason=why)

    def _stop(self, trainer: Any, step: int, what: str) -> None:
        """Stop with a message that says exactly how to continue; checkpoints written after the last good
        one are moved aside so a plain `--resume` cannot pick their state either."""
        root, start = trainer.ckpt_root, self.streak_start
        good = self._last_good_checkpoint(root, start)
        why = f"written after step {start - 1}; step {start} went non-finite from this state"
        suspect, dest = on_rank0(trainer.info.rank,
                                 lambda: set_aside_newer(root, step_of(good) if good else -1, why), root) or ([], None)
        moved = f" Checkpoints written after the last good step ({', '.join(suspect)}) were moved to {dest}." \
            if dest else ""
        raise NonFiniteLossError(f"stopping at step {step}: {what}; no checkpoint was written from them.{moved}\n"
                                 f"{continue_advice(trainer.cfg.optim, root, good)}"
                                 "Other remedies: raise optim.warmup_steps, lower optim.clip_grad, check the data.")


def continue_advice(optim: Any, root: str, good: str | None) -> str:
    """The exact arguments that continue after a non-finite stop, with a tenth of the learning rate."""
    lower = [f"optim.lr={optim.lr / 10:g}"] + ([f"optim.min_lr={optim.min_lr / 10:g}"] if optim.min_lr else [])
    fields = ",".join(arg.split("=")[0] for arg in lower)
    if good:
        path = os.path.join(root, good)
        return (f"To continue from {path}, the last checkpoint before the streak (pinned: never pruned), with a "
                f"lower learning rate, run your launch command again with these arguments added:\n"
                f"  --resume {path} --allow-change {fields} {' '.join(lower)}\n")
    return ("No checkpoint from before the streak exists. To start over with a lower learning rate, run your "
            f"launch command again with these arguments added:\n  --restart-from-scratch {' '.join(lower)}\n")

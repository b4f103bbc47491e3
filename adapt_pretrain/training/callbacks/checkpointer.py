"""The checkpointer: saves every `train.checkpoint_interval` steps and at the end of a run, never from
inside a non-finite streak, and prunes old checkpoints only once the newest one proved usable."""
from __future__ import annotations

from typing import Any

from adapt_pretrain.checkpointing import prune_checkpoints, rng_state, save_checkpoint
from adapt_pretrain.logs import get_logger
from adapt_pretrain.training.callbacks.base import Callback
from adapt_pretrain.training.callbacks.nonfinite import NonFinitePolicy, went_nonfinite
from adapt_pretrain.training.collective import exchange

log = get_logger(__name__)


class Checkpointer(Callback):
    """interval: save after every `interval` steps (0: only at the end); keep: newest checkpoints kept.

    `nonfinite` (the run's policy) tells whether the latest steps were skipped: their state is not kept.
    """

    name = "checkpointer"
    order = 100  # last: a checkpoint holds the state every other callback reached at this step

    def __init__(self, interval: int, keep: int, nonfinite: NonFinitePolicy | None = None) -> None:
        self.interval, self.keep, self.nonfinite = interval, keep, nonfinite
        self.prune_after_step: int | None = None  # prune once this step confirms the newest checkpoint
        self.saved_at = -1  # the step of this run's latest save
        self._sharded: Any = None

    def on_run_start(self, trainer: Any, start: int, end: int) -> None:
        self.saved_at = -1

    def on_step_done(self, trainer: Any, step: int, out: Any) -> None:
        if not went_nonfinite(out):
            self._confirm_and_prune(trainer, step)
        if self.interval and trainer.state.step % self.interval == 0:
            self._save_unless_nonfinite(trainer)

    def on_run_end(self, trainer: Any, result: Any) -> None:
        if result.steps_run and self.saved_at != trainer.state.step:
            self.save(trainer)  # the final state, so the run can be evaluated or continued

    def _save_unless_nonfinite(self, trainer: Any) -> None:
        """Save now unless the latest steps were skipped as non-finite (their state must not be kept)."""
        in_row = self.nonfinite.in_row if self.nonfinite is not None else 0
        step = trainer.state.step
        if in_row:
            if trainer.info.rank == 0:
                log.info(f"step {step}: checkpoint not written ({in_row} non-finite step(s) in a row)")
            trainer.monitor.log_event(step, "checkpoint_skipped_nonfinite", in_row=in_row)
            return
        self.save(trainer)

    def save(self, trainer: Any) -> str:
        """Save the trainer's state at this step (collective). Pruning waits until the next step confirms it."""
        from adapt_pretrain.megatron.run_state import checkpoint_files

        info, step = trainer.info, trainer.state.step
        meta = {"config": trainer.cfg.to_dict(), "layout": trainer.layout.as_dict(), "domains": trainer.parts.domains,
                "state": "sharded"}
        path = save_checkpoint(trainer.ckpt_root, step, lambda directory: self._write_state(trainer, directory),
                               meta, info.rank, exchange, expected=checkpoint_files(info.world_size, info.dp_size))
        self.prune_after_step, self.saved_at = step, step
        return path

    def _write_state(self, trainer: Any, directory: str) -> list[str]:
        """Collective: this step's whole state into `directory` (see megatron/run_state.py)."""
        from adapt_pretrain.megatron.dist_ckpt import ShardedCheckpointer
        from adapt_pretrain.megatron.run_state import save_trainer_state

        if self._sharded is None:
            self._sharded = ShardedCheckpointer()
        return save_trainer_state(directory, trainer.checkpoint_parts(), trainer.loop_state_dict(), rng_state(),
                                  self._sharded)

    def _confirm_and_prune(self, trainer: Any, step: int) -> None:
        """Step `step` ran with a finite loss from the checkpoint saved just before it: prune older ones.

        Deferring the prune keeps the previous checkpoint until the newest one has produced a finite
        step, so a non-finite streak that starts right after a save still finds a good one behind it.
        """
        if self.prune_after_step != step:
            return
        self.prune_after_step = None
        if trainer.info.rank == 0:
            prune_checkpoints(trainer.ckpt_root, self.keep)

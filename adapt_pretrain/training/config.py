"""`TrainConfig`: the `train` section, i.e. the training loop (not the model or the optimiser)."""
from __future__ import annotations

from dataclasses import dataclass

from adapt_pretrain.config.base import Section, flag, integer, number, optional_integer, targets, text


@dataclass
class TrainConfig(Section):
    """The training loop (not the model or the optimiser).

    steps: optimiser steps of the whole run (also the LR schedule's horizon unless optim says otherwise);
        may grow on resume: the schedule then keeps the checkpoint's horizon unless re-planned
        (docs/TRAINING.md, "Extending a run").
    micro_batch_size: sequences per micro-batch per data-parallel rank.
    global_batch_size: sequences per optimiser step over all data-parallel ranks; must be a multiple
        of micro_batch_size * dp. Leave null to use gradient_accumulation_steps instead.
    gradient_accumulation_steps: micro-batches per step per rank when global_batch_size is null (default 1).
    seed: one seed for model init, dropout and data order (each part derives its own streams).
    checkpoint_interval: save every this many steps (0: only at the end); keep_checkpoints: how many to keep.
    run_dir: metrics, checkpoints and the prepared demo data live here.
    max_nonfinite_in_row: stop (with a message) after this many consecutive non-finite steps.
    log_interval: print a console line every this many steps and at the last (stdout; stderr through the
        progress bar when it is on); metrics.jsonl gets every step.
    stop_at_step: end this invocation after that step, leaving the schedule untouched (time-boxed
        jobs and resume tests); null runs to `steps`.
    progress_bar: tqdm bar on rank 0.
    collective_timeout_s: a collective that waits longer than this fails, and the watchdog ends the
        job when a rank completes no step (or start-up, or a checkpoint save) for this long, naming
        the stuck rank (docs/RELIABILITY.md). Minutes, not torch's half-hour default: a stopped rank
        should not idle the whole job for long. Raise it when one step or one save can take longer.
    watchdog: run the hang watchdog (see collective_timeout_s).
    callbacks: your own callbacks, added to the run's (docs/TRAINING.md, "Callbacks"): each
        "package.module:Name" (a Callback class or a factory, called without arguments) or
        {target: "package.module:Name", <keyword arguments>}; e.g. the built-in profiler,
        {target: "adapt_pretrain.training.callbacks.profiler:StepProfiler", start: 10, steps: 3}.
    """

    SECTION = "train"

    steps: int = integer(100, minimum=1)
    micro_batch_size: int = integer(4, minimum=1)
    global_batch_size: int | None = optional_integer(None, minimum=1)
    gradient_accumulation_steps: int | None = optional_integer(None, minimum=1)
    seed: int = integer(1234, minimum=0)
    checkpoint_interval: int = integer(0, minimum=0)
    keep_checkpoints: int = integer(2, minimum=1)
    run_dir: str = text("runs/default", non_empty=True, hint="a directory path")
    max_nonfinite_in_row: int = integer(5, minimum=1)
    log_interval: int = integer(10, minimum=1)
    stop_at_step: int | None = optional_integer(None, minimum=1)
    progress_bar: bool = flag(True)
    collective_timeout_s: float = number(600.0, above=0)
    watchdog: bool = flag(True)
    callbacks: list = targets()

    def process_group_timeout_s(self) -> float:
        """Timeout of the process groups' collectives. With the watchdog on it is a margin longer than
        collective_timeout_s, so the watchdog (which names the stuck rank) acts first and a failing
        collective is only the backstop."""
        if not self.watchdog:
            return self.collective_timeout_s
        return self.collective_timeout_s + max(15.0, 0.1 * self.collective_timeout_s)


__all__ = ["TrainConfig"]

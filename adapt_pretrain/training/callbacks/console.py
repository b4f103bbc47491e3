"""The console: a tqdm progress bar on the logging rank and one line of key metrics every
`train.log_interval` steps (and at the last step)."""
from __future__ import annotations

import sys
from typing import Any

from adapt_pretrain.logs import get_logger
from adapt_pretrain.monitor.console import console_line
from adapt_pretrain.training.callbacks.base import Callback, StepLog

log = get_logger(__name__)


class Console(Callback):
    """progress_bar: show the bar (stderr; the metric lines then go through it, so they stay readable);
    log_interval: lines' cadence (the run's last step always gets one)."""

    def __init__(self, progress_bar: bool, log_interval: int) -> None:
        self.progress_bar, self.log_interval = progress_bar, log_interval
        self.bar: Any = None
        self.end = 0  # the step this invocation stops at (train.steps or train.stop_at_step)

    def on_run_start(self, trainer: Any, start: int, end: int) -> None:
        self.end = end
        if start >= end and trainer.info.rank == 0:
            log.info(f"nothing to run: the run is at step {start} and train.steps / train.stop_at_step end it at {end}")
        if self.progress_bar and trainer.info.is_logging_rank:
            from tqdm import tqdm

            self.bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    def log_metrics(self, trainer: Any, step: int, metrics: StepLog) -> None:
        if not trainer.info.is_logging_rank or (step % self.log_interval and step + 1 != self.end):
            return
        message = console_line(step, metrics.scalars)
        if self.progress_bar:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)
        else:
            print(message, flush=True)

    def on_step_end(self, trainer: Any, step: int, out: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{float(out.loss):.4f}", lr=f"{float(out.lr):.2e}", refresh=False)
            self.bar.update(1)

    def on_run_exit(self, trainer: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

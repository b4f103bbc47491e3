"""The run log as a callback: the `Monitor` (metrics.jsonl plus its W&B mirror) is opened when the
trainer is built, receives every step's complete metrics line and events, and is closed with the run."""
from __future__ import annotations

from typing import Any

from adapt_pretrain.training.callbacks.base import Callback, StepLog


class RunLog(Callback):
    """Owns the run's Monitor; other callbacks reach it as `trainer.monitor` (events, cadences)."""

    order = -50  # its log_metrics publishes the line before the console prints it

    def __init__(self) -> None:
        self.monitor: Any = None

    def on_setup(self, trainer: Any) -> None:
        """The logging rank holds the final results (last pipeline stage, TP rank 0, DP rank 0); other
        ranks get a monitor that writes nothing."""
        from adapt_pretrain.monitor import Monitor

        cfg = trainer.cfg
        config = {**cfg.to_dict(), "layout": trainer.layout.as_dict()}
        rank = 0 if trainer.info.is_logging_rank else 1
        self.monitor = Monitor(cfg.train.run_dir, config, cfg.wandb, rank=rank, stdout=False)

    def log_metrics(self, trainer: Any, step: int, metrics: StepLog) -> None:
        self.monitor.log_step(step, metrics.scalars, metrics.histograms or None, metrics.tables or None)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()

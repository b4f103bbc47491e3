"""The watchdog's heartbeat: each completed step tells the installed watchdog (if any) that the rank
is alive (adapt_pretrain/watchdog.py)."""
from __future__ import annotations

from typing import Any

from adapt_pretrain import watchdog
from adapt_pretrain.training.callbacks.base import Callback


class Heartbeat(Callback):
    order = 50  # after the step is logged, before a checkpoint (a hung save is then noticed)

    def on_step_done(self, trainer: Any, step: int, out: Any) -> None:
        watchdog.beat(trainer.state.step)

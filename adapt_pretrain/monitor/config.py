"""`WandbConfig`: the `wandb` section (the W&B mirror of the local metrics)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from adapt_pretrain.config.base import Section, choice, flag, integer, number, text, texts

WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig(Section):
    """W&B mirror settings (validated at construction: a bad value names its field).

    mode: "online" | "offline" | "disabled"; None resolves to $WANDB_MODE if set, else "online"
    when $WANDB_API_KEY is set, else "offline" (sync later with `wandb sync <run_dir>/wandb/offline-run-*`).
    histogram_interval / table_interval: cadence the trainer should follow for the expensive parts
    (see `Monitor.histogram_due` / `table_due`); 0 turns them off.
    dir: where W&B writes its `wandb/` folder; None means the run directory.
    init_timeout: seconds W&B may take to start a run (wandb adds ~10 s when it looks up a run to
        resume); an online start that fails or times out falls back to an offline run when
        offline_fallback is on (upload it later with `wandb sync`), else turns the mirror off.
    background: hand W&B calls to one worker thread (in order) so `wandb.log` (~2 ms for ~50 keys)
        does not block the training step; `close()` drains it.
    """

    SECTION = "wandb"

    enabled: bool = flag(True)
    project: str = text("adapt-pretrain", non_empty=True)
    mode: str | None = choice(None, WANDB_MODES, optional=True)
    entity: str | None = text(None, optional=True)
    name: str | None = text(None, optional=True)
    group: str | None = text(None, optional=True)
    tags: tuple[str, ...] = texts(default=(), as_tuple=True)
    histogram_interval: int = integer(10, minimum=0)
    table_interval: int = integer(100, minimum=0)
    dir: str | None = text(None, optional=True)
    init_timeout: float = number(30.0, above=0)
    background: bool = flag(True)
    offline_fallback: bool = flag(True)

    def resolved_mode(self) -> str:
        if not self.enabled:
            return "disabled"
        if self.mode:
            return self.mode
        env = os.environ.get("WANDB_MODE")
        if env:
            return env
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"


__all__ = ["WandbConfig", "WANDB_MODES"]

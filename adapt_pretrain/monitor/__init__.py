"""Weight-curriculum monitoring: reducible statistics, a local+W&B logger, a `.wandb` reader, plots.

The trainer uses `StatsLayout`/`partial_stats`/`finalize` (stats.py) to turn per-group weights into
metrics reduced over data-parallel ranks, `Monitor` (monitor.py) to log them and `console_line`
(console.py) for the one console line per step. See docs/MONITORING.md.
Names resolve lazily so `adapt-pretrain report` and the logger do not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Monitor": "monitor", "NullMonitor": "monitor", "WandbConfig": "config", "read_metrics": "monitor",
    "PartialStats": "stats", "StatsLayout": "stats", "StepMetrics": "stats", "empty_stats": "stats",
    "finalize": "stats", "partial_stats": "stats",
    "console_line": "console",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"adapt_pretrain.monitor.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'adapt_pretrain.monitor' has no attribute {name!r}")

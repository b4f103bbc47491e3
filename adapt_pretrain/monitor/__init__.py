"""Weight-curriculum monitoring: reducible statistics, a local+W&B logger, a `.wandb` reader, plots.

The trainer uses `StatsLayout`/`partial_stats`/`finalize` (stats.py) to turn per-group weights into
metrics reduced over data-parallel ranks, and `Monitor` (monitor.py) to log them. See docs/MONITORING.md.
"""
from adapt_pretrain.monitor.monitor import Monitor, NullMonitor, WandbConfig, read_metrics
from adapt_pretrain.monitor.stats import (
    PartialStats,
    StatsLayout,
    StepMetrics,
    empty_stats,
    finalize,
    group_token_loss,
    partial_stats,
    step_metrics,
)

__all__ = [
    "Monitor", "NullMonitor", "WandbConfig", "read_metrics", "PartialStats", "StatsLayout", "StepMetrics",
    "empty_stats", "finalize", "group_token_loss", "partial_stats", "step_metrics",
]

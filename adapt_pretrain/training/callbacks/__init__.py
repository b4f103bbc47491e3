"""The run's callbacks, one concern each; `default_callbacks(cfg)` registers them from the config.

A user's own callbacks are added with `Trainer(..., callbacks=[...])` or named in the config
(`train.callbacks`, built by configured.py); docs/TRAINING.md, "Callbacks".
"""
from __future__ import annotations

from adapt_pretrain.training.callbacks.base import Callback, CallbackList, StepLog
from adapt_pretrain.training.callbacks.checkpointer import Checkpointer
from adapt_pretrain.training.callbacks.configured import build_configured_callbacks
from adapt_pretrain.training.callbacks.console import Console
from adapt_pretrain.training.callbacks.extreme_documents import ExtremeDocuments
from adapt_pretrain.training.callbacks.heartbeat import Heartbeat
from adapt_pretrain.training.callbacks.metrics import MetricsLogger
from adapt_pretrain.training.callbacks.run_log import RunLog
from adapt_pretrain.training.callbacks.nonfinite import NonFiniteLossError, NonFinitePolicy, went_nonfinite


def default_callbacks(cfg) -> list[Callback]:
    """The callbacks every run has, configured from `cfg.train` (RunConfig), then those `train.callbacks` names."""
    train = cfg.train
    nonfinite = NonFinitePolicy(train.max_nonfinite_in_row)
    return [nonfinite, RunLog(), MetricsLogger(), ExtremeDocuments(), Console(train.progress_bar, train.log_interval),
            Heartbeat(), Checkpointer(train.checkpoint_interval, train.keep_checkpoints, nonfinite),
            *build_configured_callbacks(train.callbacks)]


__all__ = ["Callback", "CallbackList", "Checkpointer", "Console", "ExtremeDocuments", "Heartbeat", "MetricsLogger",
           "NonFiniteLossError", "NonFinitePolicy", "RunLog", "StepLog", "default_callbacks", "went_nonfinite"]

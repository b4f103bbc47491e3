"""The metrics callback: assembles each step's scalars (loss, lr, grad norm, throughput, step time, data
counters summed over data-parallel ranks, ADAPT's weight and score statistics) and logs them through
the monitor (`adapt_pretrain.monitor.Monitor`, docs/MONITORING.md). It also keeps the run's reporting
counters (samples, tokens, skipped steps), which a resume restores."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from adapt_pretrain.training.callbacks.base import Callback, StepLog
from adapt_pretrain.training.callbacks.nonfinite import went_nonfinite


class MetricsLogger(Callback):
    """Every rank runs it every step: the data counters are a collective over the data-parallel group."""

    name = "metrics"

    def __init__(self) -> None:
        self._shape: Any = None     # the model's FLOPs shape, from the config at the first step
        self._device_name: str | None = None
        self.consumed_samples = 0   # sequences consumed over all data-parallel ranks
        self.tokens = 0             # loss-carrying tokens seen (global)
        self.skipped_steps = 0      # updates skipped for a non-finite loss or gradient

    def on_anchor_refresh(self, trainer: Any, step: int, info: dict[str, Any], elapsed_s: float) -> None:
        fields = {k: v for k, v in info.items() if k != "step"}
        fields.setdefault("refresh_time_s", elapsed_s)
        trainer.monitor.log_event(step, "anchor_refresh", **fields)

    def on_step_end(self, trainer: Any, step: int, out: Any) -> None:
        self.skipped_steps += int(went_nonfinite(out))
        self.consumed_samples += trainer.samples_per_step
        self.tokens += int(out.num_tokens or 0)

    def add_metrics(self, trainer: Any, step: int, out: Any, metrics: StepLog) -> None:
        metrics.scalars.update(self._scalars(trainer, out))
        if out.metrics is not None and trainer.info.is_logging_rank:  # the global batch's, reduced over DP
            metrics.scalars.update(out.metrics.scalars)
            if trainer.monitor.histogram_due(step):
                metrics.histograms.update(out.metrics.histograms)
        metrics.scalars.update(data_stats(trainer.loader, trainer.info))

    def _scalars(self, trainer: Any, out: Any) -> dict[str, float]:
        timing = trainer.last_step
        scalars: dict[str, float] = {
            "loss": float(out.loss), "lr": float(out.lr), "train/step_time_s": timing.step_s,
            "train/anchor_refresh_s": timing.refresh_s,
            **self._throughput(trainer, timing.step_s),
            "train/skipped_steps": self.skipped_steps, "train/tokens": self.tokens,
            "train/consumed_samples": self.consumed_samples,
        }
        if out.grad_norm is not None and math.isfinite(float(out.grad_norm)):
            scalars["grad_norm"] = float(out.grad_norm)
        return scalars

    def _throughput(self, trainer: Any, step_s: float) -> dict[str, float]:
        """tokens/s, TFLOP/s per device and (on a known GPU) MFU of the step: adapt_pretrain.flops."""
        from adapt_pretrain.flops import ModelShape, current_device_name, throughput_metrics

        if self._shape is None:
            self._shape = ModelShape.from_model_config(trainer.cfg.model)
            self._device_name = current_device_name()
        tokens = trainer.samples_per_step * trainer.cfg.model.seq_len
        return throughput_metrics(tokens, max(step_s, 1e-9), self._shape, trainer.info.world_size, self._device_name)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "tokens": self.tokens,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self.tokens = int(state["tokens"])
        self.skipped_steps = int(state["skipped_steps"])


def data_stats(loader: Any, info: Any) -> dict[str, float]:
    """The loader's counters (skipped samples by kind, micro-batches, tokens) summed over DP ranks.

    Collective over the data-parallel group: every rank calls it every step.
    """
    stats = loader.stats()
    keys = sorted(k for k in stats if k != "epoch")
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    if info.dp_size > 1:
        from megatron.core import parallel_state as ps

        values = values.to(info.device)  # NCCL reduces device tensors only
        dist.all_reduce(values, group=ps.get_data_parallel_group())
    out = {f"data/{k}": float(v) for k, v in zip(keys, values.tolist())}
    out["data/epoch"] = float(stats.get("epoch", 0))
    return out

"""The one console line per logged step, shared by `Monitor` (stdout mode) and the trainer.

Why one function: the same step should read the same wherever it is printed. It shows what a
person watching a run needs at a glance; everything else is in metrics.jsonl / W&B. Keys that a
step does not carry are left out (e.g. MFU on CPU, the weights with ADAPT off), never shown as 0;
a non-finite value is shown as it is (a NaN loss must be seen).
"""
from __future__ import annotations

import math
from typing import Mapping

# (metric key, label, format); the order of the line. Throughput keys: adapt_pretrain.flops.throughput_metrics.
CONSOLE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", ".4f"),
    ("lr", "lr", ".2e"),
    ("grad_norm", "grad_norm", ".3g"),
    ("train/tokens_per_s", "tok/s", ",.0f"),
    ("train/tflops_per_device", "TFLOP/s", ".3g"),
    ("train/mfu", "MFU", ".1%"),
    ("adapt/weight_mean", "w_mean", ".3f"),
    ("adapt/weight_std", "w_std", ".3f"),
)


def console_line(step: int, scalars: Mapping[str, float]) -> str:
    """`[step N] loss=... lr=... grad_norm=... tok/s=... TFLOP/s=... MFU=...% w_mean=... w_std=...`
    from one step's logged scalars. A step with none of these keys shows its first six scalars."""
    parts = [f"{label}={_format(float(scalars[key]), fmt)}" for key, label, fmt in CONSOLE_FIELDS if key in scalars]
    if not parts:
        parts = [f"{key}={float(value):.4g}" for key, value in list(scalars.items())[:6]]
    return f"[step {step}] " + " ".join(parts)


def _format(value: float, fmt: str) -> str:
    return f"{value:{fmt}}" if math.isfinite(value) else str(value)

"""Micro-benchmark of monitoring cost per step: `python -m adapt_pretrain.monitor.overhead`.

Why: monitoring must stay under 1% of a training step. This times the monitoring path alone
(partial sums + finalise + Monitor.log_step with the demo cadence for histograms/tables) so the
number can be set against a measured step time; the trainer measures the on/off difference in a
real run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from adapt_pretrain.monitor.monitor import Monitor, WandbConfig
from adapt_pretrain.monitor.stats import StatsLayout, finalize, partial_stats


def measure(groups: int = 64, domains: int = 8, steps: int = 300, wandb_mode: str = "disabled",
            histogram_interval: int = 10, table_interval: int = 100) -> dict[str, float]:
    """Mean microseconds per step for: stats only, and stats + log_step (local file + W&B mode)."""
    g = torch.Generator().manual_seed(0)
    layout = StatsLayout(num_domains=domains)
    names = [f"d{i}" for i in range(domains)]
    batch = {"weights": torch.rand(groups, generator=g), "scores": torch.rand(groups, generator=g) * 2 - 1,
             "group_tokens": torch.randint(1, 512, (groups,), generator=g),
             "group_domain": torch.randint(0, domains, (groups,), generator=g),
             "group_loss": torch.rand(groups, generator=g) * 100}
    for _ in range(20):  # warm-up
        finalize(partial_stats(layout, **batch), names)
    t0 = time.perf_counter()
    for _ in range(steps):
        finalize(partial_stats(layout, **batch), names)
    stats_us = (time.perf_counter() - t0) / steps * 1e6
    with tempfile.TemporaryDirectory() as tmp:
        wb = WandbConfig(enabled=wandb_mode != "disabled", mode=wandb_mode, histogram_interval=histogram_interval,
                         table_interval=table_interval, dir=tmp)
        mon = Monitor(os.path.join(tmp, "run"), {"bench": True}, wb, rank=0, stdout=False)
        t0 = time.perf_counter()
        for step in range(steps):
            m = finalize(partial_stats(layout, **batch), names)
            tables = None
            if mon.table_due(step):
                tables = {"extremes": [{"domain": "d0", "id": i, "snippet": "text " * 8, "weight": 0.5} for i in range(10)]}
            mon.log_step(step, m.scalars, m.histograms if mon.histogram_due(step) else None, tables)
        total_us = (time.perf_counter() - t0) / steps * 1e6
        t1 = time.perf_counter()
        mon.close()
        close_s = time.perf_counter() - t1
    return {"stats_us": stats_us, "stats_and_log_us": total_us, "close_s": close_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--domains", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for mode in ("disabled", "offline"):
        r = measure(args.groups, args.domains, args.steps, mode)
        print(f"G={args.groups} D={args.domains} wandb={mode:<8} stats {r['stats_us']:7.0f} us/step, "
              f"stats+log_step {r['stats_and_log_us']:7.0f} us/step, close {r['close_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

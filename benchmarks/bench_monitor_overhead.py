"""Micro-benchmark of monitoring cost per step: `python benchmarks/bench_monitor_overhead.py`.

Why: monitoring must stay under 1% of a training step. This times what the training thread pays
for monitoring (partial sums + finalise + `Monitor.log_step` at the demo cadence for histograms and
tables) as medians, and the on/off difference around a stand-in training step (a matmul loop that,
like a real step, spends its time in torch kernels outside the GIL, so the W&B worker thread can
overlap). The trainer measures the on/off difference in a real run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from adapt_pretrain.monitor.monitor import Monitor, WandbConfig
from adapt_pretrain.monitor.stats import StatsLayout, finalize, partial_stats


def _batch(groups: int, domains: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"weights": torch.rand(groups, generator=g), "scores": torch.rand(groups, generator=g) * 2 - 1,
            "group_tokens": torch.randint(1, 512, (groups,), generator=g),
            "group_domain": torch.randint(0, domains, (groups,), generator=g),
            "group_loss": torch.rand(groups, generator=g) * 100}


def _fake_step(a: torch.Tensor, reps: int) -> None:
    for _ in range(reps):
        torch.mm(a, a)


def measure(groups: int = 64, domains: int = 8, steps: int = 200, wandb_mode: str = "offline",
            histogram_interval: int = 10, table_interval: int = 100, step_ms: float = 100.0) -> dict[str, float]:
    """Median µs the training thread spends in stats and in log_step, plus the on/off wall-time
    difference (%) around a stand-in step of about `step_ms` milliseconds."""
    layout = StatsLayout(num_domains=domains)
    names = [f"d{i}" for i in range(domains)]
    batch = _batch(groups, domains)
    a = torch.rand(256, 256)
    t0 = time.perf_counter()
    _fake_step(a, 20)
    reps = max(1, round(step_ms / 1e3 / ((time.perf_counter() - t0) / 20)))
    stats_t, log_t, on_t, off_t = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        wb = WandbConfig(enabled=wandb_mode != "disabled", mode=wandb_mode, histogram_interval=histogram_interval,
                         table_interval=table_interval, dir=tmp)
        mon = Monitor(os.path.join(tmp, "run"), {"bench": True}, wb, rank=0, stdout=False)
        for step in range(steps):
            t0 = time.perf_counter()  # monitoring off
            _fake_step(a, reps)
            off_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # monitoring on (same work + monitoring), interleaved against drift
            _fake_step(a, reps)
            t1 = time.perf_counter()
            m = finalize(partial_stats(layout, **batch), names)
            t2 = time.perf_counter()
            tables = None
            if mon.table_due(step):
                tables = {"extremes": [{"domain": "d0", "doc_id": i, "snippet": "text " * 8, "weight": 0.5}
                                       for i in range(10)]}
            mon.log_step(step, m.scalars, m.histograms if mon.histogram_due(step) else None, tables)
            t3 = time.perf_counter()
            on_t.append(t3 - t0)
            stats_t.append(t2 - t1)
            log_t.append(t3 - t2)
        t0 = time.perf_counter()
        mon.close()
        close_s = time.perf_counter() - t0
    off, on = statistics.median(off_t), statistics.median(on_t)
    return {"step_ms": off * 1e3, "stats_us": statistics.median(stats_t) * 1e6,
            "log_step_us": statistics.median(log_t) * 1e6, "log_step_mean_us": statistics.mean(log_t) * 1e6,
            "overhead_pct": (on - off) / off * 100, "close_s": close_s}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=64, help="token groups (documents) per step")
    p.add_argument("--domains", type=int, default=8, help="data domains")
    p.add_argument("--steps", type=int, default=200, help="measured steps, each with and without monitoring")
    p.add_argument("--step-ms", type=float, default=100.0, help="duration of the stand-in training step")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    # One intra-op thread: on a loaded machine torch's thread pool, woken by the stand-in step's
    # matmuls, made these tiny ops 100x slower (36 ms instead of 0.2 ms) and measured contention.
    torch.set_num_threads(1)
    for mode in ("disabled", "offline"):
        r = measure(args.groups, args.domains, args.steps, mode, step_ms=args.step_ms)
        print(f"G={args.groups} D={args.domains} wandb={mode:<8} step {r['step_ms']:.1f} ms | stats "
              f"{r['stats_us']:.0f} us, log_step median {r['log_step_us']:.0f} us (mean {r['log_step_mean_us']:.0f}) "
              f"| on-off {r['overhead_pct']:+.2f}% | close {r['close_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

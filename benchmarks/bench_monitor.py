"""Monitoring cost in a real run: the demo config with monitoring on and off, in one run.

    python benchmarks/bench_monitor.py [--steps 60] [key=value overrides]

One `Trainer` (W&B offline, metrics.jsonl, per-group statistics, histograms and tables at their
configured cadence) is stepped with monitoring alternately on and off (off: no per-step statistics and
their reduction over data-parallel ranks, no logging), so the model trajectory and machine load are
shared. Prints the mean step time of each, their ratio, and the time spent inside the monitoring
code itself as a fraction of a step (the steadier figure on a noisy machine). Target: under 1%.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MONITORING_HOOKS = ("add_metrics", "log_metrics")  # the trainer hooks that build and publish the metrics line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "launch", "configs", "demo-cpu.yaml"),
                   help="the run config (YAML) to time (default: launch/configs/demo-cpu.yaml)")
    p.add_argument("--steps", type=int, default=60, help="timed steps (half on, half off)")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps before the timed ones")
    p.add_argument("--data-dir", default=os.path.join(REPO, "runs", "bench-data"),
                   help="prepared data (prepared here on first use when the config has a prepare section)")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides (as for the trainer)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    from adapt_pretrain.deepspeed.launcher import configure_threads, init_distributed, read_dist_env
    from adapt_pretrain.config import load_run_config
    from adapt_pretrain.logs import quiet_known_warnings
    from adapt_pretrain.train import Trainer

    quiet_known_warnings()
    env = read_dist_env()
    configure_threads(env)
    init_distributed(env)
    run_dir = tempfile.mkdtemp(prefix="bench-monitor-")
    total = args.warmup + args.steps
    cfg = load_run_config(args.config, [f"data.data_dir={args.data_dir}", "train.progress_bar=false",
                                        "train.checkpoint_interval=0", f"train.run_dir={run_dir}",
                                        f"train.steps={total}", *args.overrides])
    trainer = Trainer(cfg, env)
    fire = trainer.callbacks.fire
    step_metrics = trainer.step_fn.adapt.step_metrics  # the statistics' partial sums and their DP reduction
    state = {"on": True, "inside": 0.0}

    def timed(fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        state["inside"] += time.perf_counter() - t0
        return out

    def switched_fire(hook: str, *a) -> None:
        """Everything monitoring adds to a step: building the metrics line and publishing it."""
        if hook not in MONITORING_HOOKS:
            return fire(hook, *a)
        if state["on"]:
            timed(fire, hook, *a)

    trainer.callbacks.fire = switched_fire
    trainer.step_fn.adapt.step_metrics = lambda: timed(step_metrics) if state["on"] else None
    times: dict[str, list[float]] = {"on": [], "off": []}
    inside: list[float] = []
    try:
        for i in range(total):
            state["on"], state["inside"] = i % 2 == 0, 0.0
            t0 = time.perf_counter()
            trainer.step_once()
            elapsed = time.perf_counter() - t0
            if i >= args.warmup:
                times["on" if state["on"] else "off"].append(elapsed)
                if state["on"]:
                    inside.append(state["inside"])
    finally:
        trainer.callbacks.fire = fire
        trainer.step_fn.adapt.step_metrics = step_metrics
        trainer.close()
    on, off = statistics.mean(times["on"]), statistics.mean(times["off"])
    inside_ms = statistics.mean(inside) * 1e3
    print(f"monitoring on : mean step {on * 1e3:8.1f} ms  (median {statistics.median(times['on']) * 1e3:.1f})")
    print(f"monitoring off: mean step {off * 1e3:8.1f} ms  (median {statistics.median(times['off']) * 1e3:.1f})")
    print(f"ratio on/off  : {on / off:.4f}")
    print(f"inside monitoring code: {inside_ms:.2f} ms per step = {100 * inside_ms / (off * 1e3):.2f}% of a step")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time and peak memory of plain cross-entropy vs the ADAPT loss path, on the same shapes.

Variants (forward + backward each):
  plain        F.cross_entropy(reduction="mean") on the logits
  adapt        group_pool + score_and_weight + weighted_cross_entropy, normalised by sum(w)
  adapt-inpl   the same with inplace_backward=True (gradient written into the logits buffer)
On CUDA it adds the compiled Triton kernels next to the torch path, and Liger-Kernel's CE when
importable, with achieved bandwidth (minimal traffic: read logits in forward, read logits and
write the gradient in backward, i.e. 3 * T * V * bytes per step, over the measured time).

Memory, CPU: every variant runs once in a fresh subprocess; after the inputs exist we reset the
kernel's RSS high-water mark (/proc/self/clear_refs), run one forward+backward and report
VmHWM - VmRSS-before (exact peak, not sampled). Inputs (logits, hidden states) are excluded; the logits' gradient and all
temporaries are included. CUDA: torch.cuda.max_memory_allocated growth over the same step.
Time: median (the target) and minimum of --reps runs after one warm-up, variants interleaved so
background load hits all of them alike; the header prints the 1-minute load average, since on a
shared 2-core machine other processes' load moves every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from adapt_pretrain.kernels import group_pool, score_and_weight, weighted_cross_entropy
from adapt_pretrain.kernels import reference
from adapt_pretrain.kernels.cross_entropy import WeightedCrossEntropy

IGNORE = -100


def make_batch(T: int, V: int, H: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Packed documents of 50-800 tokens; the last label of each document is ignored."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < T:
        lengths.append(int(torch.randint(50, 801, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - T
    group_ids = torch.cat([torch.full((n,), g) for g, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(1, n + 1) for n in lengths])
    targets = torch.randint(0, V, (T,), generator=gen)
    targets[torch.tensor(lengths).cumsum(0) - 1] = IGNORE
    batch = dict(
        logits=(torch.randn(T, V, generator=gen) * 2).to(dtype),
        hidden=torch.randn(T, H, generator=gen),
        centroid=torch.nn.functional.normalize(torch.randn(H, generator=gen), dim=0) * 0.3,
        targets=targets, group_ids=group_ids, positions=positions)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["num_groups"] = len(lengths)
    return batch


def step_plain(b: dict, logits: torch.Tensor) -> None:
    F.cross_entropy(logits, b["targets"], ignore_index=IGNORE).backward()


def _adapt_step(b: dict, logits: torch.Tensor, ce: Callable) -> None:
    pooled = group_pool(b["hidden"], b["group_ids"], b["positions"], b["num_groups"])
    _, weights = score_and_weight(pooled, b["centroid"], tau=1.0, w_min=0.0, w_max=10.0)
    wloss, _ = ce(logits, b["targets"], b["group_ids"], weights)
    token_w = torch.where(b["targets"] != IGNORE, weights[b["group_ids"]], 0.0)
    (wloss.sum() / token_w.sum()).backward()


def step_adapt(b, logits):
    _adapt_step(b, logits, weighted_cross_entropy)


def step_adapt_inplace(b, logits):
    _adapt_step(b, logits, lambda *a: weighted_cross_entropy(*a, inplace_backward=True))


def step_adapt_torch(b, logits):
    """The torch reference path even on CUDA (the public API would pick Triton there)."""
    _adapt_step(b, logits, lambda x, t, g, w: WeightedCrossEntropy.apply(
        x, t, g, w, IGNORE, False, None, 0, reference))


def step_liger(b, logits):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    LigerCrossEntropyLoss(ignore_index=IGNORE)(logits, b["targets"]).backward()


def variants(device: str) -> dict[str, Callable]:
    if device == "cpu":
        return {"plain": step_plain, "adapt": step_adapt, "adapt-inpl": step_adapt_inplace}
    out = {"plain": step_plain, "adapt-torch": step_adapt_torch, "adapt-triton": step_adapt,
           "adapt-triton-inpl": step_adapt_inplace}
    try:
        import liger_kernel  # noqa: F401

        out["liger-ce"] = step_liger
    except ImportError:
        pass
    return out


def run_once(step: Callable, b: dict) -> float:
    """One forward+backward on a fresh non-leaf copy of the logits (a model's output)."""
    leaf = b["logits"].clone().requires_grad_(True)
    logits = leaf.view_as(leaf)
    sync(b)
    start = time.perf_counter()
    step(b, logits)
    sync(b)
    return time.perf_counter() - start


def sync(b: dict) -> None:
    if b["logits"].is_cuda:
        torch.cuda.synchronize()


def measure_memory(name: str, args: argparse.Namespace) -> float:
    """Peak memory growth (MiB) of one step of `name`, measured in this (fresh) process."""
    b = make_batch(args.T, args.V, args.H, DTYPES[args.dtype], args.device)
    step = variants(args.device)[name]
    leaf = b["logits"].clone().requires_grad_(True)
    logits = leaf.view_as(leaf)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(b, logits)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    reset_peak_rss()
    base = proc_status_kib("VmRSS")
    step(b, logits)
    return (proc_status_kib("VmHWM") - base) / 1024


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_in_subprocess(name: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--T", str(args.T), "--V", str(args.V),
           "--H", str(args.H), "--dtype", args.dtype, "--device", args.device, "--memory-of", name]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_of:
        print(json.dumps({"peak_mib": measure_memory(args.memory_of, args)}))
        return 0

    b = make_batch(args.T, args.V, args.H, DTYPES[args.dtype], args.device)
    steps = variants(args.device)
    times: dict[str, list[float]] = {n: [] for n in steps}
    for n, step in steps.items():  # warm-up (and Triton compilation on CUDA)
        run_once(step, b)
    for _ in range(args.reps):
        for n, step in steps.items():
            times[n].append(run_once(step, b))
    bytes_moved = 3 * args.T * args.V * b["logits"].element_size()
    rows = {}
    for n in steps:
        t = statistics.median(times[n])
        rows[n] = {"time_s": t, "min_s": min(times[n]), "peak_mib": memory_in_subprocess(n, args),
                   "gb_per_s": bytes_moved / t / 1e9}
    base = rows["plain"]
    print(f"T={args.T} V={args.V} H={args.H} dtype={args.dtype} device={args.device} "
          f"threads={torch.get_num_threads()} reps={args.reps} groups={b['num_groups']} "
          f"loadavg(1m)={os.getloadavg()[0]:.1f}")
    print(f"{'variant':<18}{'median ms':>10}{'x plain':>9}{'min ms':>9}{'x plain':>9}"
          f"{'peak MiB':>10}{'x plain':>9}{'GB/s':>7}")
    for n, r in rows.items():
        r["time_ratio"] = r["time_s"] / base["time_s"]
        r["min_ratio"] = r["min_s"] / base["min_s"]
        r["mem_ratio"] = r["peak_mib"] / base["peak_mib"]
        print(f"{n:<18}{r['time_s'] * 1e3:>10.1f}{r['time_ratio']:>9.3f}{r['min_s'] * 1e3:>9.1f}"
              f"{r['min_ratio']:>9.3f}{r['peak_mib']:>10.1f}{r['mem_ratio']:>9.3f}{r['gb_per_s']:>7.1f}")
    adapt = rows.get("adapt") or rows["adapt-triton"]
    ok = adapt["time_ratio"] <= 1.10 and adapt["mem_ratio"] <= 1.10
    print(f"target (ADAPT <= 1.10x plain CE time and peak memory): {'met' if ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows, "target_met": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

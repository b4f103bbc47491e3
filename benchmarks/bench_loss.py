"""Time and peak memory of the ADAPT loss path against the cross-entropies a trainer would run.

Every variant computes per-token losses [T] of the same logits and back-propagates the same
non-uniform upstream gradient [T] (what a weighted, masked mean gives), forward + backward:
  torch-ce      F.cross_entropy(reduction="none") (stock torch)
  megatron-ce   megatron-core's vocab_parallel_cross_entropy times the loss mask: what the trainer
                runs with ADAPT off (GPTModel.compute_language_model_loss, TP 1)
  adapt         group_pool + score_and_weight + weighted_cross_entropy(inplace_backward=True):
                what the trainer runs with ADAPT on (the gradient reuses the logits buffer, as
                megatron's CE does)
  adapt-copy    the same with a separate gradient buffer (inplace_backward=False)
On CUDA: the compiled Triton kernels are `adapt` / `adapt-copy`; `adapt-torch` is the torch path on
the GPU; `adapt-grad-loop` is `adapt` with the previous grad kernel (one program per row looping
over the vocabulary) for the in-place comparison; `liger-ce` is Liger-Kernel's CE when importable.

Memory: peak = the logits input (the benchmark's clone of it, present before the step) plus the
growth over one step. CPU: each variant runs once in a fresh subprocess; after the inputs exist we
reset the kernel's RSS high-water mark (/proc/self/clear_refs) and report VmHWM - VmRSS(before).
CUDA: torch.cuda.max_memory_allocated growth. Time: median (the target) and minimum of --reps runs
after one warm-up, variants interleaved so background load hits all of them alike; the clone of the
input is made before the clock starts. The header prints the 1-minute load average (the CPU
machine is shared).
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

from adapt_pretrain.kernels import group_pool, reference, score_and_weight, weighted_cross_entropy
from adapt_pretrain.kernels.cross_entropy import WeightedCrossEntropy

IGNORE = -100
BASELINE = "megatron-ce"
OPTIONAL = ("liger-ce",)  # third-party baselines: left out (and said so) when they fail to run
TARGET = 1.10  # ADAPT <= 1.10x megatron's CE in time and peak memory


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
        upstream=torch.rand(T, generator=gen) * 2 / T,  # non-uniform, as a weighted mean's
        targets=targets, group_ids=group_ids, positions=positions)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["mask"] = (batch["targets"] != IGNORE).float()
    batch["num_groups"] = len(lengths)
    return batch


def step_torch_ce(b: dict, logits: torch.Tensor) -> None:
    F.cross_entropy(logits, b["targets"], ignore_index=IGNORE, reduction="none").backward(b["upstream"])


def step_megatron_ce(b: dict, logits: torch.Tensor) -> None:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    (vocab_parallel_cross_entropy(logits, b["targets"]) * b["mask"]).backward(b["upstream"])


def _adapt_step(b: dict, logits: torch.Tensor, ce: Callable) -> None:
    pooled = group_pool(b["hidden"], b["group_ids"], b["positions"], b["num_groups"])
    _, weights = score_and_weight(pooled, b["centroid"], tau=1.0, w_min=0.0, w_max=10.0)
    wloss, _ = ce(logits, b["targets"], b["group_ids"], weights)
    wloss.backward(b["upstream"])


def step_adapt(b, logits):
    _adapt_step(b, logits, lambda *a: weighted_cross_entropy(*a, inplace_backward=True))


def step_adapt_copy(b, logits):
    _adapt_step(b, logits, weighted_cross_entropy)


def step_adapt_torch(b, logits):
    """The torch path even on CUDA (the public API picks Triton there)."""
    _adapt_step(b, logits, lambda x, t, g, w: WeightedCrossEntropy.apply(
        x, t, g, w, IGNORE, True, None, 0, reference))


def step_adapt_grad_loop(b, logits):
    """`adapt` with the row-looping grad kernel (the layout before the split-vocab grid)."""
    from adapt_pretrain.kernels import triton_ce

    triton_ce.GRAD_SPLIT_V = False
    try:
        step_adapt(b, logits)
    finally:
        triton_ce.GRAD_SPLIT_V = True


def step_liger(b, logits):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    LigerCrossEntropyLoss(ignore_index=IGNORE, reduction="none")(logits, b["targets"]).backward(b["upstream"])


def variants(device: str) -> dict[str, Callable]:
    out = {"torch-ce": step_torch_ce, BASELINE: step_megatron_ce, "adapt": step_adapt, "adapt-copy": step_adapt_copy}
    if device == "cpu":
        return out
    out.update({"adapt-torch": step_adapt_torch, "adapt-grad-loop": step_adapt_grad_loop})
    try:
        import liger_kernel  # noqa: F401

        out["liger-ce"] = step_liger
    except Exception as exc:  # absent, or built for another torch/triton: an optional baseline only
        print(f"liger-ce baseline left out: {type(exc).__name__}: {exc}")
    return out


def init_megatron_tp1(device: str) -> None:
    """A one-rank process group and megatron's parallel state (its CE all-reduces over TP)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        from tests.distributed_helper import free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)


def run_once(step: Callable, b: dict) -> float:
    """One forward+backward on a fresh non-leaf copy of the logits (a model's output)."""
    leaf = b["logits"].clone().requires_grad_(True)
    logits = leaf.view_as(leaf)  # non-leaf (a model's output); its gradient reaches leaf.grad as a view
    sync(b)
    start = time.perf_counter()
    step(b, logits)
    sync(b)
    return time.perf_counter() - start


def sync(b: dict) -> None:
    if b["logits"].is_cuda:
        torch.cuda.synchronize()


def cuda_memory(step: Callable, b: dict) -> float:
    """Peak allocated-memory growth (MiB) of one step on CUDA (in-process: the allocator counts
    exactly what is live, cached blocks do not count)."""
    leaf = b["logits"].clone().requires_grad_(True)
    logits = leaf.view_as(leaf)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(b, logits)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_memory(name: str, args: argparse.Namespace) -> float:
    """Peak RSS growth (MiB) of one step of `name` on CPU, measured in this (fresh) process."""
    init_megatron_tp1(args.device)
    b = make_batch(args.T, args.V, args.H, DTYPES[args.dtype], args.device)
    step = variants(args.device)[name]
    leaf = b["logits"].clone().requires_grad_(True)
    logits = leaf.view_as(leaf)
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
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=4096, help="tokens (rows of the logits)")
    p.add_argument("--V", type=int, default=32000, help="vocabulary size (columns of the logits)")
    p.add_argument("--H", type=int, default=256, help="hidden size of the states ADAPT scores")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of logits and hidden states")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--reps", type=int, default=9, help="timed runs per variant after one warm-up")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--memory-of", metavar="VARIANT",
                   help="internal (the script reruns itself once per variant): measure this variant's "
                        "peak memory and print it as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_of:
        print(json.dumps({"peak_mib": measure_memory(args.memory_of, args)}))
        return 0

    init_megatron_tp1(args.device)
    b = make_batch(args.T, args.V, args.H, DTYPES[args.dtype], args.device)
    steps = variants(args.device)
    times: dict[str, list[float]] = {n: [] for n in steps}
    for n, step in list(steps.items()):  # warm-up (and Triton compilation on CUDA)
        try:
            run_once(step, b)
        except Exception as exc:
            if n not in OPTIONAL:
                raise
            print(f"{n} baseline left out: {type(exc).__name__}: {exc}")
            del steps[n]
    for _ in range(args.reps):
        for n, step in steps.items():
            times[n].append(run_once(step, b))
    input_mib = b["logits"].numel() * b["logits"].element_size() / 2**20
    bytes_moved = 3 * args.T * args.V * b["logits"].element_size()
    rows = {}
    for n, step in steps.items():
        t = statistics.median(times[n])
        growth = cuda_memory(step, b) if args.device == "cuda" else memory_in_subprocess(n, args)
        rows[n] = {"time_s": t, "min_s": min(times[n]), "growth_mib": growth, "peak_mib": input_mib + growth,
                   "gb_per_s": bytes_moved / t / 1e9}
    base = rows[BASELINE]
    print(f"T={args.T} V={args.V} H={args.H} dtype={args.dtype} device={args.device} "
          f"threads={torch.get_num_threads()} reps={args.reps} groups={b['num_groups']} "
          f"input={input_mib:.0f} MiB loadavg(1m)={os.getloadavg()[0]:.1f}")
    print(f"{'variant':<17}{'median ms':>10}{'x megatron':>11}{'min ms':>9}{'x megatron':>11}"
          f"{'+MiB':>9}{'peak MiB':>10}{'x megatron':>11}{'GB/s':>7}")
    for n, r in rows.items():
        r["time_ratio"] = r["time_s"] / base["time_s"]
        r["min_ratio"] = r["min_s"] / base["min_s"]
        r["mem_ratio"] = r["peak_mib"] / base["peak_mib"]
        print(f"{n:<17}{r['time_s'] * 1e3:>10.1f}{r['time_ratio']:>11.3f}{r['min_s'] * 1e3:>9.1f}"
              f"{r['min_ratio']:>11.3f}{r['growth_mib']:>9.0f}{r['peak_mib']:>10.0f}{r['mem_ratio']:>11.3f}"
              f"{r['gb_per_s']:>7.1f}")
    adapt = rows["adapt"]
    ok = adapt["time_ratio"] <= TARGET and adapt["mem_ratio"] <= TARGET
    print(f"target (adapt <= {TARGET:.2f}x {BASELINE} in median time and peak memory): {'met' if ok else 'NOT met'}")
    grad_rows = grad_kernel_table(b) if args.device == "cuda" else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows, "target_met": ok, "grad_kernels": grad_rows}, f, indent=1)
    return 0 if ok else 1


def grad_kernel_table(b: dict) -> dict[str, float]:
    """CUDA: the Triton backward kernel alone (triton.testing.do_bench, median ms) in both grid
    layouts, copying and in place, with the bandwidth of its minimal traffic (read the logits,
    write the gradient)."""
    from triton.testing import do_bench

    from adapt_pretrain.kernels import triton_ce

    logits = b["logits"].clone()
    T, V = logits.shape
    weights = torch.rand(b["num_groups"], device=logits.device) + 0.5
    m, d, xt, _ = triton_ce.ce_stats(logits, b["targets"], 0, IGNORE)
    lse, _, _ = triton_ce.ce_finalize(m, d, xt, b["targets"], b["group_ids"], weights, IGNORE)
    bytes_moved = 2 * T * V * logits.element_size()
    rows: dict[str, float] = {}
    print(f"grad kernel alone (T={T}, V={V}, {logits.dtype}): median ms, GB/s of 2 x T x V x bytes")
    for split in (True, False):
        for inplace in (False, True):
            out = logits if inplace else torch.empty_like(logits)
            triton_ce.GRAD_SPLIT_V = split
            ms = do_bench(lambda: triton_ce.ce_grad(logits, lse, b["targets"], b["group_ids"], weights,
                                                    b["upstream"], 0, IGNORE, out), return_mode="median")
            name = f"{'split-V' if split else 'row-loop'} {'in-place' if inplace else 'copy'}"
            rows[name] = ms
            print(f"  {name:<20}{ms:>8.3f} ms{bytes_moved / ms / 1e6:>9.0f} GB/s")
    triton_ce.GRAD_SPLIT_V = True
    return rows


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())

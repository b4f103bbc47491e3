"""Training throughput and model-FLOPs utilisation (MFU) of the megatron step engine, ADAPT off and on.

    python benchmarks/bench_mfu.py                                   # demo model on CPU (smoke run)
    python benchmarks/bench_mfu.py --config launch/configs/gpt-1b.yaml parallel.tensor=1 \\
        parallel.sequence_parallel=false train.micro_batch_size=8 train.global_batch_size=64   # one GPU

One model, optimiser and `TrainStep` (the trainer's own step engine: megatron's schedule, our loss,
finalize and optimiser step) on synthetic packed micro-batches of the config's shape; the step's
`engine` alternates between ADAPT off and ADAPT on (`adapt` section of the config, enabled), so
both see the same weights, shapes and machine state. After `--warmup` steps of each, `--steps`
steps of each are timed (CUDA-synchronised), pairs alternating which goes first. The ADAPT-on
anchor refresh (a forward of the trunk over `adapt.num_anchors` anchor sequences) is timed
`--refreshes` times and charged to ADAPT on as refresh time / `adapt.refresh_interval` per step, i.e.
exactly its share in a run; the refresh's fraction of a step is printed too.

FLOPs per token (the usual convention, e.g. Megatron-LM's and the PaLM paper's): 6 N + 12 L h s,
where N counts the matmul parameters including the output layer (QKV and output projections, MLP,
h x V; embedding lookups are free) and 12 L h s the attention score and value products (QK^T and
AV, forward + backward), causal masking not discounted. ADAPT's own pooling/scoring and the anchor
refresh are *not* counted as useful FLOPs, so their cost shows as lower MFU with ADAPT on.
MFU = achieved FLOP/s / peak; peak: the GPU's dense bf16 peak from adapt_pretrain.flops.peak_bf16_flops
(989 TFLOP/s on an H100/H200 SXM), none on CPU or an unknown device (override with --peak-tflops).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flops_per_token(model) -> tuple[int, int]:
    """(6 N + 12 L h s, N) for a ModelConfig (see the module docstring)."""
    from adapt_pretrain.flops import ModelShape, matmul_params, training_flops

    shape = ModelShape.from_model_config(model)
    return training_flops(shape, 1), matmul_params(shape)


def packed_micro_batch(b: int, s: int, vocab: int, gen: torch.Generator) -> dict[str, Any]:
    """Documents of 64-1024 tokens packed into [b, s] (the data stream's format, no padding)."""
    tokens = torch.randint(0, vocab, (b, s), generator=gen)
    gid = torch.empty((b, s), dtype=torch.long)
    pos = torch.empty((b, s), dtype=torch.long)
    mask = torch.ones((b, s))
    groups = 0
    for row in range(b):
        t = 0
        while t < s:
            n = min(int(torch.randint(64, 1025, (1,), generator=gen)), s - t)
            gid[row, t:t + n], pos[row, t:t + n] = groups, torch.arange(1, n + 1)
            mask[row, t + n - 1] = 0.0
            groups, t = groups + 1, t + n
    return dict(tokens=tokens, labels=torch.roll(tokens, -1, dims=1), loss_mask=mask, group_id=gid, position=pos,
                num_groups=groups)


def anchor_micro_batches(num_anchors: int, b: int, s: int, vocab: int, dp_rank: int, dp_size: int,
                         gen: torch.Generator) -> list[dict[str, Any]]:
    """This DP rank's share of `num_anchors` anchor sequences, one document of length s each (the
    longest an anchor can be), in micro-batches of b (short ones padded with group -1)."""
    mine = len(range(dp_rank, num_anchors, dp_size))
    per_rank = math.ceil(math.ceil(num_anchors / dp_size) / b)  # as data.anchors.anchor_batches
    batches = []
    for i in range(per_rank):
        rows = max(0, min(b, mine - i * b))
        gid = torch.full((b, s), -1, dtype=torch.long)
        pos = torch.zeros((b, s), dtype=torch.long)
        gid[:rows] = torch.arange(rows)[:, None]
        pos[:rows] = torch.arange(1, s + 1)
        tokens = torch.randint(0, vocab, (b, s), generator=gen)
        batches.append(dict(tokens=tokens, labels=tokens, loss_mask=torch.zeros((b, s)), group_id=gid,
                            position=pos, num_groups=b))
    return batches


def load_bench_config(path: str, overrides: list[str]):
    """The run config with its data section pointed at an empty directory that `prepare` would fill
    (never run here): the benchmark feeds synthetic batches, so no prepared shards are needed."""
    from adapt_pretrain.config import RunConfig, apply_overrides, read_config_file

    raw = apply_overrides(read_config_file(path), list(overrides))
    raw["data"] = {**(raw.get("data") or {}), "data_dir": tempfile.mkdtemp(prefix="bench-mfu-data-")}
    raw["prepare"] = {"inputs": "demo"}
    return RunConfig.from_dict(raw, source=path)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args) -> float:
    sync()
    start = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - start


def run(cfg, warmup: int, steps: int, refreshes: int, peak_tflops: float | None) -> dict[str, Any]:
    import dataclasses

    from adapt_pretrain.core import AdaptEngine
    from adapt_pretrain.layout import micro_batches_per_step
    from adapt_pretrain.megatron import TrainStep, build_model, build_optimizer, setup_parallel
    from adapt_pretrain.megatron.model import resolve_attention

    info = setup_parallel(cfg.parallel, cfg.train.seed)
    model = cfg.model
    num_micro = micro_batches_per_step(cfg.train, info.dp_size)
    b, s = cfg.train.micro_batch_size, model.seq_len
    chunks = build_model(model, cfg.parallel)
    optimizer, scheduler = build_optimizer(chunks, cfg.optim)
    engine_on = AdaptEngine(dataclasses.replace(cfg.adapt, enabled=True, warmup_steps=0))
    engine_off = AdaptEngine(dataclasses.replace(cfg.adapt, enabled=False))
    step_fn = TrainStep(chunks, optimizer, scheduler, engine_off, model, cfg.parallel, num_micro, gather_groups=False)
    gen = torch.Generator().manual_seed(cfg.train.seed + info.dp_rank)
    pool = [[packed_micro_batch(b, s, model.vocab_size, gen) for _ in range(num_micro)] for _ in range(2)]
    anchors = anchor_micro_batches(cfg.adapt.num_anchors, b, s, model.vocab_size, info.dp_rank, info.dp_size, gen)

    times: dict[str, list[float]] = {"off": [], "on": []}
    step = 0
    step_fn.engine = engine_on
    refresh_s = [timed(step_fn.refresh_anchors, 0, anchors)]  # the first one also warms up
    for i in range(warmup + steps):
        order = ("off", "on") if i % 2 == 0 else ("on", "off")
        for name in order:
            step_fn.engine = engine_on if name == "on" else engine_off
            t = timed(step_fn, step, pool[step % 2])
            step += 1
            if i >= warmup:
                times[name].append(t)
    step_fn.engine = engine_on
    refresh_s = [timed(step_fn.refresh_anchors, step + k, anchors) for k in range(refreshes)] or refresh_s

    per_token, params = flops_per_token(model)
    tokens = num_micro * b * info.dp_size * s  # the global batch
    step_flops = per_token * tokens
    off = statistics.median(times["off"])
    on = statistics.median(times["on"])
    refresh = statistics.median(refresh_s)
    interval = cfg.adapt.refresh_interval
    on_amortised = on + refresh / interval
    world = info.world_size
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "attention": resolve_attention(model.attention), "recompute": model.recompute,
        "fusions": bool(model.fusions and torch.cuda.is_available()),  # megatron's fusions are GPU only
        "layout": {"tp": info.tp_size, "pp": info.pp_size, "dp": info.dp_size},
        "seq_len": s, "micro_batch": b, "num_microbatches": num_micro, "tokens_per_step": tokens,
        "matmul_params": params, "flops_per_token": per_token, "refresh_interval": interval,
        "anchor_sequences": cfg.adapt.num_anchors, "steps_timed": steps,
        "step_off_s": off, "step_on_s": on, "refresh_s": refresh, "refresh_over_step": refresh / off,
        "step_on_amortised_s": on_amortised, "ratio_on_off": on_amortised / off, "ratio_on_off_no_refresh": on / off,
        "tokens_per_s_off": tokens / off, "tokens_per_s_on": tokens / on_amortised,
        "tflops_per_gpu_off": step_flops / off / world / 1e12, "tflops_per_gpu_on": step_flops / on_amortised / world / 1e12,
        "peak_tflops": peak_tflops, "threads": torch.get_num_threads(),
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    if peak_tflops:
        result["mfu_off"] = result["tflops_per_gpu_off"] / peak_tflops
        result["mfu_on"] = result["tflops_per_gpu_on"] / peak_tflops
    return result


def report(name: str, r: dict[str, Any]) -> str:
    mfu = (lambda k: f"{100 * r[k]:.1f}%") if r.get("peak_tflops") else (lambda k: "n/a")
    return "\n".join([
        f"[{name}] {r['device']}, attention={r['attention']} recompute={r['recompute']} fusions={r['fusions']} "
        f"layout TP{r['layout']['tp']} PP{r['layout']['pp']} DP{r['layout']['dp']}, {r['tokens_per_step']} tokens/step "
        f"({r['num_microbatches']} x {r['micro_batch']} x {r['seq_len']} per rank), "
        f"N={r['matmul_params'] / 1e6:.1f}M, {r['flops_per_token'] / 1e9:.3f} GFLOP/token (6N + 12Lhs)",
        f"  ADAPT off: {r['step_off_s']:.3f} s/step  {r['tokens_per_s_off']:,.0f} tokens/s  "
        f"{r['tflops_per_gpu_off']:.3g} TFLOP/s/GPU  MFU {mfu('mfu_off')}",
        f"  ADAPT on : {r['step_on_s']:.3f} s/step + refresh {r['refresh_s']:.3f} s / {r['refresh_interval']} "
        f"= {r['step_on_amortised_s']:.3f} s  {r['tokens_per_s_on']:,.0f} tokens/s  "
        f"{r['tflops_per_gpu_on']:.3g} TFLOP/s/GPU  MFU {mfu('mfu_on')}",
        f"  ADAPT on/off: {r['ratio_on_off']:.4f}x with the anchor refresh amortised "
        f"({r['ratio_on_off_no_refresh']:.4f}x per step without it; one refresh = {r['refresh_over_step']:.2f} steps)"
        + (f"; peak memory {r['max_memory_gib']:.1f} GiB" if r.get("max_memory_gib") else ""),
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "launch", "configs", "demo-cpu.yaml"),
                   help="the run config (YAML) to time (default: launch/configs/demo-cpu.yaml)")
    p.add_argument("--name", help="label of the printed block (default: the config's file name)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each (compilation, allocator)")
    p.add_argument("--steps", type=int, default=4, help="timed steps of each")
    p.add_argument("--refreshes", type=int, default=2, help="timed anchor refreshes")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-GPU peak for MFU (default: the GPU's bf16 peak from adapt_pretrain.flops, none on CPU)")
    p.add_argument("--json", help="append the figures as one JSON line to this file")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (as for the trainer)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from adapt_pretrain.megatron import teardown_parallel
    from adapt_pretrain.logs import quiet_known_warnings

    quiet_known_warnings()
    cfg = load_bench_config(args.config, args.overrides)
    from adapt_pretrain.flops import current_device_name, peak_bf16_flops

    known = peak_bf16_flops(current_device_name())
    peak = args.peak_tflops or (known / 1e12 if known else None)
    result = run(cfg, args.warmup, args.steps, args.refreshes, peak)
    result["config"] = os.path.relpath(args.config, REPO)
    result["overrides"] = args.overrides
    teardown_parallel()
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        print(report(args.name or os.path.basename(args.config), result))
        if args.json:
            with open(args.json, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    raise SystemExit(main())

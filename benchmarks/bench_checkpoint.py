"""Bytes written and time per checkpoint save at data-parallel 2: the legacy per-rank `torch.save`
against the sharded megatron checkpoint (fully parallel, plain, asynchronous).

    python benchmarks/bench_checkpoint.py                  # 2 gloo processes on CPU, ~10 M parameters
    python benchmarks/bench_checkpoint.py --hidden 1024 --layers 8 --repeats 5

Both processes build the same GPT (Llama-style: RMSNorm, SwiGLU, RoPE), take one optimiser step so
Adam's moments exist, then save `--repeats` times in each format into a fresh directory. Time is
rank 0's wall time from a barrier before the save to a barrier after it (the save is collective);
bytes are every file the save wrote. Legacy = what the trainer wrote before sharded checkpoints:
each rank `torch.save`s its model chunks, optimiser and scheduler (`TrainStep.state_dict`). Prints
medians and the sharded/legacy ratios measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _micro_batch(vocab: int, seq: int, rows: int) -> dict:
    g = torch.Generator().manual_seed(0)
    group = torch.arange(rows).unsqueeze(1).expand(rows, seq).contiguous()
    return {"tokens": torch.randint(0, vocab, (rows, seq), generator=g),
            "labels": torch.randint(0, vocab, (rows, seq), generator=g), "loss_mask": torch.ones(rows, seq),
            "group_id": group, "position": torch.arange(1, seq + 1).expand(rows, seq).contiguous(),
            "group_domain": torch.zeros(rows, dtype=torch.long), "group_doc_id": torch.arange(rows),
            "group_bm25": torch.zeros(rows), "num_groups": rows}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, root: str, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from adapt_pretrain.megatron import ModelConfig, OptimConfig, ParallelConfig, TrainStep, build_model, build_optimizer
    from adapt_pretrain.megatron import setup_parallel
    from adapt_pretrain.megatron.dist_ckpt import ShardedCheckpointer, ShardedCheckpointOptions

    parallel = ParallelConfig()
    setup_parallel(parallel, 1)
    model = ModelConfig(vocab_size=args.vocab, seq_len=args.seq, hidden_size=args.hidden, num_layers=args.layers,
                        num_attention_heads=8, ffn_hidden_size=int(args.hidden * 8 / 3) // 8 * 8, activation="swiglu",
                        normalization="RMSNorm", position_embedding="rope", add_bias_linear=False)
    chunks = build_model(model, parallel)
    optimizer, scheduler = build_optimizer(chunks, OptimConfig(total_steps=10))
    step = TrainStep(chunks, optimizer, scheduler, None, model, parallel, 1, gather_groups=False)
    step(0, [_micro_batch(args.vocab, args.seq, 2)])
    params = sum(p.numel() for c in chunks for p in c.parameters())

    def timed(save, name: str) -> tuple[float, int]:
        directory = os.path.join(root, name)
        if rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
            os.makedirs(directory)
        dist.barrier()
        start = time.perf_counter()
        save(directory)
        dist.barrier()
        elapsed = time.perf_counter() - start
        return elapsed, _dir_bytes(directory)

    def legacy(directory: str) -> None:
        torch.save(step.state_dict(), os.path.join(directory, f"rank_{rank:05d}.pt"))

    sync_fp = ShardedCheckpointer(ShardedCheckpointOptions(fully_parallel_save=True))
    sync_plain = ShardedCheckpointer(ShardedCheckpointOptions(fully_parallel_save=False))
    asynchronous = ShardedCheckpointer(ShardedCheckpointOptions(async_save=True))
    blocking: list[float] = []

    def run_async(directory: str) -> None:
        t0 = time.perf_counter()
        asynchronous.save(directory, chunks, optimizer, scheduler)
        blocking.append(time.perf_counter() - t0)  # what a training step waits for
        asynchronous.finalize(blocking=True)

    results: dict[str, list] = {}
    for i in range(args.repeats):  # interleaved, so machine load drifts hit every format alike
        for name, save in (("legacy", legacy),
                           ("sharded", lambda d: sync_fp.save(d, chunks, optimizer, scheduler)),
                           ("sharded_replica0", lambda d: sync_plain.save(d, chunks, optimizer, scheduler)),
                           ("sharded_async", run_async)):
            results.setdefault(name, []).append(timed(save, f"{name}_{i}"))
    if rank == 0:
        out = {name: {"seconds": statistics.median(t for t, _ in runs), "bytes": runs[-1][1]}
               for name, runs in results.items()}
        out["sharded_async"]["blocking_seconds"] = statistics.median(blocking)
        out["parameters"] = params
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384, help="hidden size of the GPT")
    p.add_argument("--layers", type=int, default=4, help="transformer layers")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--seq", type=int, default=64, help="sequence length")
    p.add_argument("--repeats", type=int, default=3, help="saves per format (medians are printed)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--json", help="also write the figures to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    try:
        procs = [ctx.Process(target=_worker, args=(r, 2, port, args, root, queue)) for r in range(2)]
        for proc in procs:
            proc.start()
        out = queue.get(timeout=3600)
        for proc in procs:
            proc.join()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    legacy = out["legacy"]
    print(f"GPT {out['parameters'] / 1e6:.1f} M parameters (fp32, Adam), data-parallel 2, {args.repeats} saves each")
    print(f"{'format':<18} {'MB written':>11} {'x legacy':>9} {'save s':>8} {'x legacy':>9}")
    for name in ("legacy", "sharded", "sharded_replica0", "sharded_async"):
        r = out[name]
        print(f"{name:<18} {r['bytes'] / 1e6:11.1f} {r['bytes'] / legacy['bytes']:9.2f} {r['seconds']:8.2f} "
              f"{r['seconds'] / legacy['seconds']:9.2f}")
    print(f"sharded_async: save() returns after {out['sharded_async']['blocking_seconds']:.2f} s "
          f"({out['sharded_async']['blocking_seconds'] / legacy['seconds']:.2f} x legacy); the rest runs in the background")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

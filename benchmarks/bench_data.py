"""Data-path benchmark: loader tokens/s (packing included) with 1 and 2 workers, memory vs shard count.

Prepares the bundled demo corpus twice (about 100 and about 1000 shards, same tokenizer), streams
micro-batches through `DataStream` and prints: tokens/s (wall and per CPU-second of the loader's
processes, which is robust to a busy machine), and peak memory (PSS, shared pages split fairly) of the loader's processes.
Usage: python benchmarks/bench_data.py [--seq-len 512] [--batches 400] [--trainer-tokens-per-s 10000]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time

import psutil

from adapt_pretrain.data import DataConfig, DataStream, Manifest, PrepareConfig, demo_corpus_paths, prepare


def _tree_cpu_rss(proc: psutil.Process) -> tuple[float, int]:
    cpu, rss = 0.0, 0
    for p in [proc] + proc.children(recursive=True):
        try:
            t = p.cpu_times()
            cpu += t.user + t.system
            rss += p.memory_full_info().pss  # proportional: forked workers share torch's pages
        except psutil.NoSuchProcess:
            pass
    return cpu, rss


def stream_run(data_dir: str, workers: int, seq_len: int, mbs: int, batches: int) -> dict:
    """Stream `batches` micro-batches; tokens are real (non-padding) input tokens."""
    me = psutil.Process()
    ds = DataStream(DataConfig(data_dir=data_dir, seq_len=seq_len, micro_batch_size=mbs, num_workers=workers,
                               mode="infinite"), dp_rank=0, dp_size=1)
    gen = iter(ds)
    next(gen)  # worker start-up is not throughput
    cpu0_self = sum(me.cpu_times()[:2])
    cpu0, _ = _tree_cpu_rss(me)
    t0 = time.perf_counter()
    tokens, peak = 0, 0
    for i, b in enumerate(itertools.islice(gen, batches)):
        tokens += int((b["group_id"] >= 0).sum())
        if i % 20 == 0:
            peak = max(peak, _tree_cpu_rss(me)[1])
    wall = time.perf_counter() - t0
    cpu1, rss = _tree_cpu_rss(me)
    gen.close()
    return {"workers": workers, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "cpu_s": cpu1 - cpu0, "tokens_per_cpu_s": tokens / max(cpu1 - cpu0, 1e-9),
            "main_cpu_s": sum(me.cpu_times()[:2]) - cpu0_self, "peak_rss_mb": max(peak, rss) / 2**20}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed sequence")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--batches", type=int, default=400, help="micro-batches streamed per measurement")
    p.add_argument("--trainer-tokens-per-s", type=float, default=10000.0,
                   help="what the demo trainer consumes (the target is >= 20x this)")
    p.add_argument("--workdir", default=None,
                   help="where the two prepared corpora are written (default: a new temporary directory)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} CPUs (wall figures depend on it)")
    dirs = {}
    tok = None
    total = None
    for n_shards in (100, 1000):
        out = os.path.join(work, f"shards{n_shards}")
        shard_tokens = max(1, (total or 1_200_000) // n_shards)
        for _ in range(4):  # documents are indivisible: adjust shard_tokens until the count is near target
            if os.path.isfile(os.path.join(out, "manifest.json")):
                got = len(Manifest.load(out).shards("train"))
                if 0.8 * n_shards <= got <= 1.25 * n_shards:
                    break
                shard_tokens = max(1, int(shard_tokens * got / n_shards))
            t = time.time()
            prepare(PrepareConfig(inputs=demo_corpus_paths(), out_dir=out, tokenizer=tok, shard_tokens=shard_tokens,
                                  num_workers=2, progress=False, overwrite=True))
            print(f"prepared {out} (shard_tokens={shard_tokens}) in {time.time() - t:.1f}s")
        man = Manifest.load(out)
        tok = man.tokenizer_path
        total = man.raw["splits"]["train"]["tokens"] + man.raw["splits"]["val"]["tokens"]
        dirs[n_shards] = out
        print(f"  {n_shards:>4}-shard target: {len(man.shards('train'))} train shards, {total} tokens")
    results = {"throughput": [], "memory": []}
    for w in (1, 2):
        r = stream_run(dirs[100], w, args.seq_len, args.micro_batch_size, args.batches)
        results["throughput"].append(r)
        print(f"workers={w}: {r['tokens_per_s']:,.0f} tokens/s wall, {r['tokens_per_cpu_s']:,.0f} tokens per CPU-s "
              f"(loader processes), main process {r['main_cpu_s']:.2f} CPU-s for {r['tokens']:,} tokens; "
              f"{r['tokens_per_s'] / args.trainer_tokens_per_s:.0f}x a {args.trainer_tokens_per_s:,.0f} tokens/s trainer")
    for n_shards, d in dirs.items():
        r = stream_run(d, 2, args.seq_len, args.micro_batch_size, args.batches)
        r["shards"] = len(Manifest.load(d).shards("train"))
        results["memory"].append(r)
        print(f"{r['shards']:>5} shards, 2 workers: peak PSS (main + workers) {r['peak_rss_mb']:.0f} MB, "
              f"{r['tokens_per_s']:,.0f} tokens/s")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

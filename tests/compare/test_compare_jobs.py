"""`compare --jobs 2` on a tiny config: runs train at the same time, the log stays one line per event,
overrides and eval settings reach the runs, `--corpus` is required and one out_dir holds one comparison,
and `--estimate` counts FLOPs as a hand count does."""
from __future__ import annotations

import fcntl
import json
import os

import yaml

from .conftest import run_module

TINY_RUN = {"model": {"vocab_size": 512, "seq_len": 32, "hidden_size": 32, "num_layers": 1, "num_attention_heads": 2,
                      "bf16": False},
            "train": {"steps": 3, "micro_batch_size": 2, "log_interval": 1},
            "optim": {"warmup_steps": 1}, "data": {"num_workers": 0}, "adapt": {"num_anchors": 4, "refresh_interval": 2},
            "wandb": {"enabled": False}}


def test_jobs_run_at_once_with_line_logs(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "out_dir": "out", "prepare": {"vocab_size": 512, "num_anchors": 4, "anchor_domains": ["python_doc"],
                                      "num_workers": 1},
        "run": TINY_RUN, "methods": ["uniform", "linupper"], "seeds": [1],
        "eval": {"max_tokens": 256, "docs": 8}}))
    missing = run_module(["adapt_pretrain.experiments.compare", "--config", str(config), "--out-dir", str(tmp_path / "out")], timeout=60)
    assert missing.returncode == 2 and "--corpus" in missing.stderr  # no corpus named: a clear error
    args = ["adapt_pretrain.experiments.compare", "--config", str(config), "--corpus", "demo", "--out-dir", str(tmp_path / "out"),
            "--jobs", "2", "run.train.steps=4"]
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / ".compare.lock", "w") as held:  # another compare in this out_dir
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = run_module(args, timeout=60)
    assert busy.returncode == 2 and "another compare is running" in busy.stderr
    proc = run_module(args, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # progress notes on stderr, one prefixed line per event; each run's result on stdout, one line each
    events = [line for line in proc.stderr.splitlines() if line.startswith("[compare ")]
    assert "\r" not in proc.stdout + proc.stderr
    assert sum(line.endswith(" start uniform seed 1") or line.endswith(" start linupper seed 1") for line in events) == 2
    results = [line for line in proc.stdout.splitlines() if line.startswith(("[1/2] ", "[2/2] "))]
    assert len(results) == 2 and not any(line.startswith("[compare ") for line in proc.stdout.splitlines()), proc.stdout
    results = {m: json.load(open(tmp_path / "out" / "runs" / f"{m}-s1" / "result.json")) for m in ("uniform", "linupper")}
    walls = [r["train_wall"] for r in results.values()]
    assert max(w[0] for w in walls) < min(w[1] for w in walls), walls  # the two trainings overlapped in time
    for method, result in results.items():
        assert result["steps"] == 4  # the command-line override reached the run
        assert result["eval"]["settings"]["max_tokens"] == 256
        assert all(d["tokens"] <= 256 for d in result["eval"]["domains"].values())
        assert not os.path.exists(tmp_path / "out" / "runs" / f"{method}-s1" / "eval.json")  # eval's own file stays free
    assert "| linupper | 1 |" in (tmp_path / "out" / "results.md").read_text()
    # --estimate (and a finished plan: nothing left to do): per token, forward = 2 x matmul parameters (1 x (4*32^2 + 2*32*128) + 32*512 = 28672)
    # + attention scores 2 x 2 x 32 x 32 = 4096, so 61440; training is 3 forwards: 184320 x 4 x 2 x 32 tokens
    est = run_module([*args, "--estimate", "1e-6"], timeout=120)
    assert est.returncode == 0, est.stderr[-2000:]
    assert "uniform: 4 steps x 64 tokens = 256 tokens" in est.stdout
    assert f"{184320 * 256:.3g} training FLOPs per run" in est.stdout
    assert "2 finished (0 to re-evaluate), 0 to do" in est.stderr
    assert f"all 2 runs: {2 * 184320 * 256:.3g} training FLOPs = {2 * 184320 * 256 / 1e6:.0f} s at 1e-06 TFLOP/s" in est.stdout

"""Smoke run of benchmarks/bench_mfu.py on CPU: a tiny demo-shaped model, ADAPT off and on, anchor
refresh included; checks the figures it writes are complete and consistent (not their speed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_mfu_smoke(tmp_path):
    out = tmp_path / "mfu.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_mfu.py"), "--warmup", "1", "--steps", "1",
           "--refreshes", "1", "--json", str(out), "model.num_layers=2", "model.hidden_size=32",
           "model.num_attention_heads=2", "model.seq_len=32", "model.vocab_size=256", "train.micro_batch_size=2",
           "train.global_batch_size=4", "adapt.num_anchors=3", "adapt.refresh_interval=5",
           f"train.run_dir={tmp_path}/run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ADAPT on/off" in proc.stdout and "6N + 12Lhs" in proc.stdout
    r = json.loads(out.read_text().splitlines()[-1])
    assert r["attention"] == "sdpa" and r["tokens_per_step"] == 4 * 32
    # 6N + 12 L h s with N = 2 layers x (4 h^2 + 8 h^2) + h V (gelu MLP 4h, tied output layer counted once)
    n = 2 * 12 * 32 * 32 + 32 * 256
    assert r["matmul_params"] == n and r["flops_per_token"] == 6 * n + 12 * 2 * 32 * 32
    assert r["refresh_s"] > 0 and r["step_off_s"] > 0 and r["step_on_s"] > 0
    assert abs(r["step_on_amortised_s"] - (r["step_on_s"] + r["refresh_s"] / 5)) < 1e-9
    assert r["peak_tflops"] is None and "mfu_off" not in r  # no CPU peak is claimed

"""benchmarks/gpu_compare.sh --smoke: the GPU comparison's config and script, shrunk to a tiny model on
the bundled corpus, run end to end on CPU (every method of the GPU config, two runs at a time, deepspeed
and wandb unimportable as on the GPU machine); what lands in $OUT must come back from the GPU machine."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile

from .conftest import REPO, child_env

METHODS = ("uniform", "adapt", "adapt-std", "linupper", "topk-bm25")


def test_gpu_compare_smoke(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(["bash", "benchmarks/gpu_compare.sh", "--smoke"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=child_env(OUT=str(out), COMPARE_WORK=str(work), PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(os.listdir(out))
    # the device returns at most 8 files, named in letters, digits, '.', '_' and '-'
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).is_file() for f in files), files
    assert {"results.md", "summary.png", "domain_delta.png", "train_loss.png", "weight_curricula.png",
            "gpu_compare.log", "runs.tar.gz"} <= set(files)
    report = (out / "results.md").read_text()
    for m in METHODS:
        assert f"| {m} | 1 |" in report, m
    log = (out / "gpu_compare.log").read_text()
    assert "\r" not in log and "5 runs planned, 5 finished" in log
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert sorted(n for n in names if n.endswith("result.json")) == sorted(f"runs/{m}-s1/result.json" for m in METHODS)
    assert not any("checkpoints" in n for n in names)


def test_gpu_compare_carry_needs_the_corpora(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu_compare.sh", "--carry", str(tmp_path / "nowhere")], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=child_env(CARRY=str(tmp_path / "carry")))
    assert proc.returncode == 2 and "give the corpora folder" in proc.stdout
    bare = subprocess.run(["bash", "benchmarks/gpu_compare.sh", "--carry"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=child_env(CARRY=str(tmp_path / "carry")))
    assert bare.returncode == 2 and "give the corpora folder" in bare.stdout  # no default machine path

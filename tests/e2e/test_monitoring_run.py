"""Monitoring from a real short run: W&B offline received what metrics.jsonl says, the document
table carries text snippets, and the report renders non-blank plots."""
from __future__ import annotations

import gzip
import json
import os
import subprocess

import pytest

from .conftest import TINY_MODEL
from .helpers import PYTHON, REPO, env, run

DEMO = os.path.join(REPO, "launch", "configs", "demo-cpu.yaml")
STEPS = 6


@pytest.fixture(scope="module")
def monitored_run(demo_data_dir, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("monitored") / "run")
    cmd = [PYTHON, "-m", "adapt_pretrain.train", "--config", DEMO, *TINY_MODEL, f"data.data_dir={demo_data_dir}",
           f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.micro_batch_size=4", "train.global_batch_size=8",
           "train.progress_bar=false", "train.checkpoint_interval=0", "optim.warmup_steps=1",
           "adapt.refresh_interval=3", "adapt.num_anchors=8", "wandb.enabled=true", "wandb.mode=offline",
           "wandb.histogram_interval=2", "wandb.table_interval=3"]
    e = env()
    e["WANDB_MODE"] = "offline"
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_wandb_offline_log_equals_local_mirror(monitored_run):
    from adapt_pretrain.monitor.verify import verify_wandb_mirror

    check = verify_wandb_mirror(monitored_run, timeout=60)
    assert check.mismatches == []
    assert check.complete and check.steps == STEPS
    assert check.values > STEPS * 10  # scalars of every step, histograms and tables were compared


def demo_texts() -> dict[str, str]:
    """domain -> all its text, read from the bundled corpus independently of the pipeline."""
    from adapt_pretrain.data.demo import demo_corpus_paths

    texts: dict[str, list[str]] = {}
    for path in demo_corpus_paths():
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                doc = json.loads(line)
                texts.setdefault(doc["domain"], []).append(doc["text"])
    return {d: "\n".join(t) for d, t in texts.items()}


def test_extreme_document_table_has_snippets_from_the_documents(monitored_run):
    from adapt_pretrain.monitor import read_metrics

    steps, _ = read_metrics(monitored_run)
    tables = [line["tables"]["extreme_documents"] for line in steps.values() if line.get("tables")]
    assert tables, "no table logged"
    texts = demo_texts()
    squash = {d: " ".join(t.split()) for d, t in texts.items()}
    rows = [row for table in tables for row in table]
    assert rows and all(row["snippet"] for row in rows)
    weights = [row["weight"] for row in tables[0]]
    assert weights[0] == max(weights) and weights[-1] == min(weights)
    found = 0
    for row in rows:
        words = " ".join(row["snippet"].split()).split(" ")
        probe = " ".join(words[1:4])  # inner words: BPE may split the first and last ones
        found += probe in squash[row["domain"]]
    assert found >= 0.8 * len(rows), f"only {found}/{len(rows)} snippets found in their domain's text"


def test_report_renders_non_blank_plots(monitored_run, tmp_path):
    import numpy as np
    from matplotlib import image

    run([PYTHON, "-m", "adapt_pretrain.cli", "report", monitored_run, "--out", str(tmp_path)])
    pngs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
    assert {"curriculum.png", "weight_heatmap.png", "loss.png", "effective.png"} <= set(pngs)
    for name in pngs:
        pixels = image.imread(str(tmp_path / name))
        assert pixels.std() > 0.01, f"{name} looks blank"
    assert "curriculum.png" in (tmp_path / "index.html").read_text()

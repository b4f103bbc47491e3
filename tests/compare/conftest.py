"""Shared fixtures of the comparison tests: one tiny trained run on the bundled demo corpus."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(**extra: str) -> dict[str, str]:
    """Our environment for a child process, without a launcher's rank variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_module(args: list[str], timeout: float = 240.0, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=child_env(**env), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> str:
    """A 2-step run of a tiny GPT on the demo corpus (vocabulary 512), with its final checkpoint."""
    from adapt_pretrain.data.config import PrepareConfig
    from adapt_pretrain.data.demo import demo_corpus_paths
    from adapt_pretrain.data.prepare import prepare

    root = tmp_path_factory.mktemp("trained")
    data = str(root / "data")
    prepare(PrepareConfig(inputs=demo_corpus_paths(), out_dir=data, vocab_size=512, num_anchors=4,
                          anchor_domains=["python_doc"], progress=False, num_workers=1))
    run_dir = str(root / "run")
    proc = run_module(["adapt_pretrain.train", "model.vocab_size=512", "model.seq_len=32", "model.hidden_size=32",
                       "model.num_layers=1", "model.num_attention_heads=2", f"data.data_dir={data}",
                       "data.num_workers=0", f"train.run_dir={run_dir}", "train.steps=2", "train.micro_batch_size=2",
                       "train.progress_bar=false", "optim.warmup_steps=1", "adapt.enabled=false",
                       "wandb.enabled=false"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir

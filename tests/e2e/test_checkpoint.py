"""Checkpoint files: atomic commit, `latest`, pruning, failure agreement, launcher argument handling.

Fast, in-process checks of the pieces the multi-process tests rely on (those prove exact resume).
"""
from __future__ import annotations

import os

import pytest
import torch

from adapt_pretrain.checkpoint import CheckpointError, find_checkpoint, load_rank_state, read_meta, save_checkpoint
from adapt_pretrain.deepspeed.launcher import read_dist_env, strip_local_rank

META = {"config": {"train": {"steps": 9}}, "layout": {"world_size": 1}}


def _save(root, step, **kw):
    return save_checkpoint(str(root), step, {"w": torch.full((3,), float(step))}, META, rank=0, barrier=lambda: None,
                           **kw)


def test_atomic_save_latest_and_prune(tmp_path):
    root = tmp_path / "ckpt"
    for step in (2, 4, 6):
        _save(root, step, keep=2)
    assert sorted(os.listdir(root)) == ["latest", "step_000004", "step_000006"]
    path = find_checkpoint(str(root))
    assert path.endswith("step_000006") and read_meta(path)["step"] == 6
    assert torch.equal(load_rank_state(path, 0)["w"], torch.full((3,), 6.0))
    # a crash in the middle of a later save leaves a .tmp directory: it is ignored, latest is intact
    os.makedirs(root / "step_000008.tmp")
    (root / "step_000008.tmp" / "rank_00000.pt").write_bytes(b"partial")
    assert find_checkpoint(str(root)).endswith("step_000006")
    _save(root, 8, keep=2)  # the next save of that step replaces the leftovers
    assert sorted(os.listdir(root)) == ["latest", "step_000006", "step_000008"]
    with pytest.raises(CheckpointError, match="different number of ranks"):
        load_rank_state(find_checkpoint(str(root)), 1)


def test_failure_on_any_rank_raises_everywhere(tmp_path):
    """all_ok(False) from the reduction (another rank failed) makes this rank raise, nothing committed."""
    root = tmp_path / "ckpt"
    _save(root, 2)
    with pytest.raises(CheckpointError, match="another rank failed"):
        _save(root, 4, all_ok=lambda ok: False)
    assert find_checkpoint(str(root)).endswith("step_000002")


def test_launcher_arguments_and_env(monkeypatch):
    rest, local = strip_local_rank(["--local_rank=1", "--config", "x.yaml", "train.steps=3"])
    assert rest == ["--config", "x.yaml", "train.steps=3"] and local == 1
    rest, local = strip_local_rank(["--config", "x.yaml", "--local_rank", "0"])
    assert rest == ["--config", "x.yaml"] and local == 0
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "CROSS_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    plain = read_dist_env()
    assert (plain.rank, plain.world_size, plain.launcher) == (0, 1, "none")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("CROSS_RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    ds = read_dist_env(local_rank_arg=1)
    assert (ds.rank, ds.world_size, ds.local_rank, ds.local_world_size, ds.master_addr, ds.master_port, ds.launcher) \
        == (3, 4, 1, 2, "10.0.0.1", 29999, "deepspeed")

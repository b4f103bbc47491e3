"""Checkpoint files: atomic commit, manifest checksums, verification, selection, pruning, moving aside.

Fast, in-process checks on real files of the pieces the multi-process tests rely on (those, in
test_resume_faults.py, test_nonfinite.py and test_launch_resume.py, prove the trainer's behaviour).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from adapt_pretrain.checkpointing import (CheckpointError, find_checkpoint, load_rank_state, pin_checkpoint,
                                       prune_checkpoints, read_meta, save_checkpoint, select_checkpoint, set_aside_all,
                                       set_aside_newer, verify_checkpoint, verify_everywhere)
from adapt_pretrain.deepspeed.launcher import read_dist_env, strip_local_rank

from .helpers import flip_byte, snapshot, truncate

META = {"config": {"train": {"steps": 9}}, "layout": {"world_size": 1}}


def _save(root, step, **kw):
    return save_checkpoint(str(root), step, {"w": torch.full((3,), float(step))}, META, rank=0, **kw)


def _saved(root, *steps):
    for step in steps:
        _save(root, step)
    return str(root)


def test_atomic_save_manifest_and_prune(tmp_path):
    root = _saved(tmp_path / "ckpt", 2, 4, 6)
    assert sorted(os.listdir(root)) == ["latest", "step_000002", "step_000004", "step_000006"]
    manifest = json.loads(open(os.path.join(root, "step_000006", "manifest.json")).read())
    assert sorted(manifest["files"]) == ["meta.json", "rank_00000.pt"]
    assert all(len(e["sha256"]) == 64 and e["size"] > 0 and e["rank"] == 0 for e in manifest["files"].values())
    path = find_checkpoint(root)
    assert path.endswith("step_000006") and read_meta(path)["step"] == 6
    assert torch.equal(load_rank_state(path, 0)["w"], torch.full((3,), 6.0))
    assert prune_checkpoints(root, keep=2) == ["step_000002"]
    # a crash in the middle of a later save leaves a .tmp directory: it is ignored, latest is intact
    os.makedirs(os.path.join(root, "step_000008.tmp"))
    open(os.path.join(root, "step_000008.tmp", "rank_00000.pt"), "wb").write(b"partial")
    assert find_checkpoint(root).endswith("step_000006")
    _save(root, 8)  # the next save of that step replaces the leftovers
    assert sorted(os.listdir(root)) == ["latest", "step_000004", "step_000006", "step_000008"]
    with pytest.raises(CheckpointError, match="different number of ranks"):
        load_rank_state(find_checkpoint(root), 1)


def test_prune_spares_the_pinned_checkpoint(tmp_path):
    root = _saved(tmp_path / "ckpt", 1, 2, 3, 4)
    pin_checkpoint(root, "step_000001", "last checkpoint before a non-finite streak")
    assert prune_checkpoints(root, keep=1) == ["step_000003", "step_000002"]
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == ["step_000001", "step_000004"]
    open(os.path.join(root, "pinned"), "wb").write(b"\xff\x00")  # an unreadable pin protects everything
    _save(root, 5)
    assert prune_checkpoints(root, keep=1) == []


def test_failure_on_any_rank_raises_everywhere(tmp_path):
    """Another rank's failure (seen through the exchange) makes this rank raise; nothing is committed."""
    root = _saved(tmp_path / "ckpt", 2)

    def other_rank_fails(obj):
        return [obj, ("rank 1 cannot write its checkpoint file", {})] if isinstance(obj, tuple) else [obj, ""]

    with pytest.raises(CheckpointError, match="rank 1 cannot write") as err:
        _save(root, 4, exchange=other_rank_fails)
    assert err.value.same_on_every_rank
    assert find_checkpoint(root).endswith("step_000002") and not os.path.exists(os.path.join(root, "step_000004"))


@pytest.mark.parametrize("damage, expected", [
    (lambda d: flip_byte(os.path.join(d, "rank_00000.pt")), "rank_00000.pt does not match its recorded sha256"),
    (lambda d: truncate(os.path.join(d, "rank_00000.pt")), "rank_00000.pt has"),
    (lambda d: truncate(os.path.join(d, "meta.json")), "meta.json has"),
    (lambda d: os.remove(os.path.join(d, "rank_00000.pt")), "rank_00000.pt is missing"),
    (lambda d: truncate(os.path.join(d, "manifest.json")), "manifest.json is unreadable"),
    (lambda d: os.remove(os.path.join(d, "manifest.json")), "manifest.json is missing"),
])
def test_verify_names_each_damage(tmp_path, damage, expected):
    root = _saved(tmp_path / "ckpt", 3)
    ckpt = os.path.join(root, "step_000003")
    assert verify_checkpoint(ckpt, 0) == []
    damage(ckpt)
    problems = verify_checkpoint(ckpt, 0)
    assert len(problems) == 1 and expected in problems[0], problems


def test_format_1_checkpoint_without_manifest_is_accepted(tmp_path):
    """Checkpoints written before checksums existed still resume (unverified); format 2 needs its manifest."""
    ckpt = tmp_path / "step_000003"
    ckpt.mkdir()
    torch.save({"w": torch.ones(2)}, ckpt / "rank_00000.pt")
    (ckpt / "meta.json").write_text(json.dumps({**META, "step": 3, "format": 1}))
    assert verify_checkpoint(str(ckpt), 0) == []
    assert verify_checkpoint(str(ckpt), 1) == ["rank_00001.pt is missing"]


def test_verify_everywhere_names_the_ranks(tmp_path):
    root = _saved(tmp_path / "ckpt", 3)
    ckpt = os.path.join(root, "step_000003")

    def two_ranks(problems):  # rank 1 reports its own file missing, both see the same meta problem
        return [problems + ["meta.json bad"], ["rank_00001.pt is missing", "meta.json bad"]]

    assert verify_everywhere(ckpt, 0, two_ranks) == ["meta.json bad (every rank)", "rank_00001.pt is missing (rank 1)"]


@pytest.mark.parametrize("latest, note", [(b"", "is empty"), (b"\x00\xffgarbage", "unreadable"),
                                          (b"hello", "not a checkpoint name"), (b"step_000009", "does not exist")])
def test_select_scans_past_damage_and_bad_latest(tmp_path, latest, note):
    root = _saved(tmp_path / "ckpt", 1, 2, 3)
    flip_byte(os.path.join(root, "step_000003", "rank_00000.pt"))
    truncate(os.path.join(root, "step_000002", "meta.json"))
    open(os.path.join(root, "latest"), "wb").write(latest)
    selection = select_checkpoint(root, 0)
    assert selection.path.endswith("step_000001")
    assert [name for name, _ in selection.rejected] == ["step_000003", "step_000002"]
    assert "sha256" in selection.describe_rejected() and "meta.json has" in selection.describe_rejected()
    assert any(note in n for n in selection.notes), selection.notes


def test_select_with_nothing_usable(tmp_path):
    root = _saved(tmp_path / "ckpt", 1)
    os.remove(os.path.join(root, "step_000001", "manifest.json"))
    selection = select_checkpoint(root, 0)
    assert selection.path is None and selection.holds_checkpoints and selection.rejected
    assert not select_checkpoint(str(tmp_path / "empty"), 0).holds_checkpoints
    os.makedirs(tmp_path / "only_latest")
    (tmp_path / "only_latest" / "latest").write_text("step_000040")  # its folder was deleted
    assert select_checkpoint(str(tmp_path / "only_latest"), 0).holds_checkpoints


def test_moving_aside_never_deletes(tmp_path):
    root = _saved(tmp_path / "ckpt", 1, 2, 3)
    before = snapshot(root)
    newer, dest = set_aside_newer(root, 1, "rollback")
    assert newer == ["step_000003", "step_000002"] and open(os.path.join(root, "latest")).read() == "step_000001"
    assert open(os.path.join(dest, "WHY.txt")).read() == "rollback\n"
    old_timeline = {k: v for k, v in before.items() if k.startswith(("step_000002", "step_000003"))}
    _save(root, 2)  # the new timeline's step 2 leaves the old one alone
    assert {k: v for k, v in snapshot(dest).items() if k != "WHY.txt"} == old_timeline
    current = {k: v for k, v in snapshot(root).items() if not k.startswith("superseded_")}
    dest = set_aside_all(root, "restart")
    assert all(n.startswith("superseded_") for n in os.listdir(root))
    assert {k: v for k, v in snapshot(dest).items() if k != "WHY.txt"} == current


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

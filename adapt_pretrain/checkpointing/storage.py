"""Writing a checkpoint atomically (step_N.tmp renamed once every rank is done) and reading it back."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Sequence

import torch

from adapt_pretrain.checkpointing.integrity import describe_files, write_manifest
from adapt_pretrain.checkpointing.names import (
    CheckpointError, Exchange, FORMAT_VERSION, LATEST, META, RankState, atomic_write_text, rank_file,
    single_process, step_dir_name)
from adapt_pretrain.checkpointing.retention import set_aside


def write_rank_state(directory: str, rank: int, rank_state: RankState) -> dict[str, dict[str, Any]]:
    """Serialise this rank's state into `directory`; returns the manifest entries of the files written.

    The only function that knows how a rank's state becomes files. A collective writer's files are
    owned (verified on resume) by the rank that reports them.
    """
    if callable(rank_state):
        return describe_files(directory, list(rank_state(directory)), rank)
    name = rank_file(rank)
    path = os.path.join(directory, name)
    torch.save(rank_state, path + ".part")
    os.replace(path + ".part", path)
    return describe_files(directory, [name], rank)


def _raise_if_any(errors: Sequence[str], consequence: str) -> None:
    failed = [e for e in errors if e]
    if failed:
        raise CheckpointError("; ".join(failed) + f". {consequence}", same_on_every_rank=True)


def save_checkpoint(root: str, step: int, rank_state: RankState, meta: dict[str, Any], rank: int,
                    exchange: Exchange = single_process, expected: Sequence[str] = ()) -> str:
    """Collectively save `rank_state` of every rank for `step`; returns the final directory.

    Every rank must call this. `exchange` (an all-gather) synchronises the ranks and tells every one
    of them whether all succeeded, so all raise together instead of the healthy ones waiting forever
    at the next collective. Rank 0 writes meta.json, then the manifest (last), then commits.
    Pruning is the caller's decision (`prune_checkpoints`).
    `expected`: files (relative to the step directory) that must exist before the commit, beyond
    those the ranks reported.
    """
    final = os.path.join(root, step_dir_name(step))
    tmp = final + ".tmp"
    intact = "The previous checkpoint is intact."
    error = ""
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash during an earlier save
            os.makedirs(tmp)
        except OSError as exc:
            error = f"rank 0 cannot create {tmp}: {exc}"
    _raise_if_any(exchange(error), intact)  # also a barrier: nobody writes before tmp exists
    files: dict[str, dict[str, Any]] = {}
    try:
        files = write_rank_state(tmp, rank, rank_state)
    except (OSError, RuntimeError) as exc:
        error = f"rank {rank} cannot write its checkpoint files into {tmp}: {exc}"
    reports = exchange((error, files))
    _raise_if_any([e for e, _ in reports], intact)
    if rank == 0:
        try:
            _commit(root, step, tmp, final, meta, {k: v for _, f in reports for k, v in f.items()}, expected)
        except (OSError, CheckpointError) as exc:
            error = f"rank 0 cannot commit checkpoint step {step}: {exc}"
    _raise_if_any(exchange(error), intact)
    return final


def _commit(root: str, step: int, tmp: str, final: str, meta: dict[str, Any], files: dict[str, dict],
            expected: Sequence[str] = ()) -> None:
    unseen = sorted(n for n in files if not os.path.exists(os.path.join(tmp, n)))
    if unseen:
        raise CheckpointError(f"{unseen} were written by other ranks but are not visible in {tmp}: "
                              "is run_dir on a filesystem every node sees?")
    missing = [name for name in expected if not os.path.exists(os.path.join(tmp, name))]
    if missing:
        raise CheckpointError(f"{', '.join(missing[:8])} missing in {tmp} after every rank wrote: "
                              "is run_dir on a shared filesystem?")
    atomic_write_text(os.path.join(tmp, META),
                       json.dumps({**meta, "step": step, "format": FORMAT_VERSION, "time": time.time()},
                                  indent=1, sort_keys=True, default=str))
    write_manifest(tmp, step, {**files, **describe_files(tmp, [META], rank=0)})
    if os.path.exists(final):  # only after a rollback left it behind: move it, never overwrite it
        set_aside(root, [os.path.basename(final)], f"replaced by a new save of step {step}")
    os.replace(tmp, final)
    atomic_write_text(os.path.join(root, LATEST), step_dir_name(step))


# ----- load ---------------------------------------------------------------------------------------


def load_rank_state(ckpt_dir: str, rank: int) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, rank_file(rank))
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: the checkpoint was written by a different number of ranks")
    # weights_only=False: the state holds optimiser/scheduler objects and numpy RNG tuples we wrote ourselves
    return torch.load(path, map_location="cpu", weights_only=False)

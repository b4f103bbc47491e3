"""Atomic, resumable checkpoints: the run's state, plus the config and layout it belongs to.

Layout on disk (`run_dir` must be on a filesystem every node sees):
    checkpoints/step_000040/meta.json        step, config, parallel layout (rank 0)
    checkpoints/step_000040/model/           model chunks, optimiser, scheduler: a sharded megatron
                                             checkpoint, readable by any layout (megatron/dist_ckpt.py)
    checkpoints/step_000040/run/             ADAPT engine, data cursors, RNG, loop counters
                                             (megatron/run_state.py)
    checkpoints/latest                       name of the newest complete checkpoint
What goes into a step directory is the writer's business (`write_rank_state`); legacy checkpoints
held one `rank_NNNNN.pt` per rank instead. A checkpoint is written into `step_N.tmp/` and renamed
only after every rank has finished, so a crash mid-save leaves the previous checkpoint intact and
`latest` never points at a partial one. Resuming compares the saved config and layout with the
current ones and refuses any difference that would silently change the run (different model, data,
global batch), naming each field; the parallel layout itself may change.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

FORMAT_VERSION = 1
LATEST = "latest"

# Config fields that may change between a run and its resume without changing what is computed.
# data.data_dir may move: the data stream checks the manifest's content hash itself on resume.
# prepare.* only acts when the data dir has no manifest, which a resumable run always has.
SAFE_TO_CHANGE = (
    "train.steps", "train.log_interval", "train.checkpoint_interval", "train.keep_checkpoints",
    "train.stop_at_step", "train.progress_bar", "train.max_nonfinite_in_row", "train.run_dir",
    "wandb.", "data.prefetch_factor", "data.verify_checksums", "data.data_dir", "prepare.",
    # the layout: model and optimiser are resharded, the data stream is redistributed; what must
    # stay is the global batch, checked separately (`layout_problems`)
    "parallel.", "data.num_workers", "train.global_batch_size", "train.gradient_accumulation_steps",
)
# A rank's state: a dict saved as its own file (legacy), or a collective writer that every rank calls
# with the temporary step directory and that returns the names of the files it wrote.
RankState = Union[dict[str, Any], Callable[[str], list[str]]]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the run that tries to resume it."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


# ----- RNG ----------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every random stream a step can touch (dropout, init, sampling) so a resume replays them."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        try:
            from megatron.core import tensor_parallel

            state["megatron_cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
        except Exception:  # tracker not initialised (e.g. a plain torch model): nothing to save
            pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        if "megatron_cuda_tracker" in state:
            from megatron.core import tensor_parallel

            tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_cuda_tracker"])


# ----- save ---------------------------------------------------------------------------------------

def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_rank_state(directory: str, rank: int, rank_state: RankState) -> list[str]:
    """Write this rank's part of a checkpoint into `directory`; returns the names of the files written.

    The only function that knows how a rank's state becomes files."""
    if callable(rank_state):
        return list(rank_state(directory))
    path = os.path.join(directory, rank_file(rank))
    torch.save(rank_state, path + ".part")
    os.replace(path + ".part", path)
    return [rank_file(rank)]


def save_checkpoint(root: str, step: int, rank_state: RankState, meta: dict[str, Any], rank: int,
                    barrier: Callable[[], None], keep: int = 2,
                    all_ok: Callable[[bool], bool] | None = None, expected: Sequence[str] | None = None) -> str:
    """Collectively save `rank_state` of every rank for `step`; returns the final directory.

    Every rank must call this (it synchronises with `barrier`). Rank 0 owns the directory moves.
    `all_ok(flag)` (an all-reduce of "did my part work") lets every rank learn that some rank failed
    to write, so all of them raise instead of the healthy ones waiting forever at the next barrier.
    `expected`: files (relative to the step directory) that must exist before the commit; default:
    every rank's file of the legacy format.
    """
    def agree(ok: bool) -> bool:  # synchronises like a barrier, and tells every rank whether all succeeded
        if all_ok is not None:
            return all_ok(ok)
        barrier()
        return ok

    final = os.path.join(root, step_dir_name(step))
    tmp = final + ".tmp"
    error = ""
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash during an earlier save
            os.makedirs(tmp)
        except OSError as exc:
            error = f"rank 0 cannot create {tmp}: {exc}"
    barrier()
    if not error:
        try:
            write_rank_state(tmp, rank, rank_state)
        except (OSError, RuntimeError) as exc:
            error = f"rank {rank} cannot write its checkpoint files into {tmp}: {exc}"
    if not agree(not error):
        raise CheckpointError(error or f"another rank failed to write checkpoint step {step} (see its log); "
                                       "the previous checkpoint is intact")
    if rank == 0:
        try:
            if expected is None:
                expected = [rank_file(r) for r in range(int(meta["layout"]["world_size"]))]
            missing = [name for name in expected if not os.path.exists(os.path.join(tmp, name))]
            if missing:
                raise CheckpointError(f"{', '.join(missing[:8])} missing in {tmp} after every rank wrote: "
                                      "is run_dir on a shared filesystem?")
            _atomic_write_text(os.path.join(tmp, "meta.json"),
                               json.dumps({**meta, "step": step, "format": FORMAT_VERSION, "time": time.time()},
                                          indent=1, sort_keys=True, default=str))
            if os.path.exists(final):  # re-saving a step after a resume: replace the old copy
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write_text(os.path.join(root, LATEST), step_dir_name(step))
            _prune(root, keep)
        except (OSError, CheckpointError) as exc:
            error = str(exc)
    if not agree(not error):
        raise CheckpointError(error or f"rank 0 failed to commit checkpoint step {step} (see its log)")
    return final


def _prune(root: str, keep: int) -> None:
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
    for name in done[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ----- load ---------------------------------------------------------------------------------------

def find_checkpoint(root_or_dir: str) -> str | None:
    """A checkpoint directory from either a checkpoint root (via `latest`) or a step directory."""
    if os.path.exists(os.path.join(root_or_dir, "meta.json")):
        return root_or_dir
    latest = os.path.join(root_or_dir, LATEST)
    if os.path.exists(latest):
        with open(latest, encoding="utf-8") as fh:
            path = os.path.join(root_or_dir, fh.read().strip())
        if os.path.exists(os.path.join(path, "meta.json")):
            return path
    return None


def read_meta(ckpt_dir: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, "meta.json"), encoding="utf-8") as fh:
        return json.load(fh)


def load_rank_state(ckpt_dir: str, rank: int) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, rank_file(rank))
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: the checkpoint was written by a different number of ranks")
    # weights_only=False: the state holds optimiser/scheduler objects and numpy RNG tuples we wrote ourselves
    return torch.load(path, map_location="cpu", weights_only=False)


# ----- compatibility ------------------------------------------------------------------------------

def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Unsafe differences between two config dicts, as 'field: saved -> current' lines."""
    old, new = _flatten(json.loads(json.dumps(saved, default=str))), _flatten(json.loads(json.dumps(current, default=str)))
    lines = []
    for key in sorted(set(old) | set(new)):
        if _safe(key):
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b:
            lines.append(f"  {key}: {a!r} (checkpoint) -> {b!r} (now)")
    return lines


def global_batch(layout: dict[str, Any]) -> int | None:
    """Sequences per optimiser step over all data-parallel ranks."""
    try:
        return int(layout["dp"]) * int(layout["num_microbatches"]) * int(layout["micro_batch_size"])
    except (KeyError, TypeError, ValueError):
        return None


def layout_problems(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """A layout change is safe (resharded model and optimiser, redistributed data) unless the global
    batch changes: the optimiser would then take other steps than the saved run."""
    before, after = global_batch(saved), global_batch(now)
    if before == after:
        return []
    return [f"the global batch changed: {before} sequences per step (checkpoint: dp={saved.get('dp')} x "
            f"{saved.get('num_microbatches')} micro-batches x {saved.get('micro_batch_size')}) -> {after} (now: "
            f"dp={now.get('dp')} x {now.get('num_microbatches')} x {now.get('micro_batch_size')}); set "
            f"train.global_batch_size={before} to keep it with another data-parallel size"]


def same_layout(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    keys = ("world_size", "tp", "pp", "vp", "dp")
    return all(saved.get(k) == now.get(k) for k in keys)


def check_resume_compatible(meta: dict[str, Any], config: dict[str, Any], layout: dict[str, Any]) -> None:
    """Raise CheckpointError naming every unsafe change between the checkpoint and this run."""
    problems: list[str] = layout_problems(meta.get("layout", {}), layout)
    cfg_diff = config_differences(meta.get("config", {}), config)
    if cfg_diff:
        problems.append("the config changed in fields that alter the run:\n" + "\n".join(cfg_diff))
    if problems:
        safe = ", ".join(s.rstrip(".") + ("*" if s.endswith(".") else "") for s in SAFE_TO_CHANGE)
        raise CheckpointError(
            f"cannot resume from checkpoint at step {meta.get('step')}:\n" + "\n".join(problems)
            + f"\nFields that may change on resume: {safe}. Start a new run_dir to train with a different setup.")


__all__ = ["CheckpointError", "SAFE_TO_CHANGE", "save_checkpoint", "find_checkpoint", "read_meta",
           "load_rank_state", "check_resume_compatible", "config_differences", "layout_problems", "rng_state",
           "same_layout", "set_rng_state", "write_rank_state"]

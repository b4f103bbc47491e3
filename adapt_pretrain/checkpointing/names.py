"""Names, constants and the error type every part of the checkpoint package shares."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Union


FORMAT_VERSION = 2  # 2: manifest.json with per-file checksums; 1: no manifest (loaded unverified)
CHECKPOINT_SUBDIR = "checkpoints"  # a run directory's checkpoints live in <run_dir>/checkpoints
LATEST, META, MANIFEST, PINNED = "latest", "meta.json", "manifest.json", "pinned"
SUPERSEDED_PREFIX = "superseded_"
_STEP_DIR = re.compile(r"^step_(\d+)$")


Exchange = Callable[[Any], list[Any]]  # all-gather of a small picklable object over every rank

# A rank's state: a dict saved as its own file (legacy), or a collective writer that every rank calls
# with the temporary step directory and that returns the names of the files it wrote.
RankState = Union[dict[str, Any], Callable[[str], list[str]]]


def single_process(obj: Any) -> list[Any]:
    """The `Exchange` of a one-process run."""
    return [obj]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, incomplete, or does not match the run that tries to resume it.

    same_on_every_rank: every rank raised this same verdict (agreed collectively), so one rank prints it.
    """

    def __init__(self, message: str, same_on_every_rank: bool = False) -> None:
        super().__init__(message)
        self.same_on_every_rank = same_on_every_rank


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"

def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

def read_meta(ckpt_dir: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, META), encoding="utf-8") as fh:
        return json.load(fh)


def checkpoint_root(run_dir: str) -> str:
    """Where a run directory keeps its checkpoints."""
    return os.path.join(run_dir, CHECKPOINT_SUBDIR)

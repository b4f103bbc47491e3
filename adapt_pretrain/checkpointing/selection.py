"""Finding the checkpoint to resume: newest first, the first that verifies everywhere; `latest` only a hint."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from adapt_pretrain.checkpointing.integrity import verify_everywhere
from adapt_pretrain.checkpointing.names import (
    CheckpointError, Exchange, LATEST, META, checkpoint_root, single_process, step_dir_name, step_of)


def committed_checkpoints(root: str) -> list[str]:
    """Names of the committed step folders under `root`, newest first (no `.tmp` leftovers)."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if step_of(n) is not None and os.path.isdir(os.path.join(root, n))]
    return sorted(names, key=lambda n: step_of(n) or 0, reverse=True)


def _first_line(path: str) -> str | None:
    """The stripped first line of a small text file (`latest`, `pinned`); None if it is not readable text."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip()
    except (OSError, UnicodeDecodeError):
        return None


def read_latest(root: str) -> tuple[str | None, str | None]:
    """(`latest`'s checkpoint name if it names an existing folder, why it cannot be used otherwise)."""
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None, None
    text = _first_line(path)
    if text is None:
        return None, f"checkpoints/{LATEST} is unreadable (not text)"
    if not text:
        return None, f"checkpoints/{LATEST} is empty"
    if step_of(text) is None:
        return None, f"checkpoints/{LATEST} holds {text[:40]!r}, not a checkpoint name"
    if not os.path.isdir(os.path.join(root, text)):
        return None, f"checkpoints/{LATEST} names {text}, which does not exist"
    return text, None


@dataclass
class Selection:
    """What `select_checkpoint` found under a checkpoint root."""

    path: str | None = None                                              # newest checkpoint that verified
    rejected: list[tuple[str, list[str]]] = field(default_factory=list)  # newer ones that did not, and why
    notes: list[str] = field(default_factory=list)                       # e.g. why `latest` was not used
    holds_checkpoints: bool = False                                      # step folders or a `latest` exist

    def describe_rejected(self) -> str:
        return "\n".join(f"  {name}: {'; '.join(reasons)}" for name, reasons in self.rejected)


def select_checkpoint(root: str, rank: int, exchange: Exchange = single_process) -> Selection:
    """The newest checkpoint under `root` whose files verify on every rank. Collective.

    Scans the step folders rather than trusting `latest`, which may be empty, damaged or stale (a user
    who deleted the newest folder to roll back). Rank 0's listing is shared so every rank walks the
    same list; each candidate costs one exchange, and normally the first one verifies.
    """
    view = (committed_checkpoints(root), *read_latest(root), os.path.exists(os.path.join(root, LATEST)))
    names, latest, latest_problem, has_latest = exchange(view if rank == 0 else None)[0]
    selection = Selection(holds_checkpoints=bool(names) or has_latest)
    for name in names:
        problems = verify_everywhere(os.path.join(root, name), rank, exchange)
        if not problems:
            selection.path = os.path.join(root, name)
            break
        selection.rejected.append((name, problems))
    if latest_problem:
        selection.notes.append(latest_problem)
    elif latest and selection.path and latest != os.path.basename(selection.path):
        selection.notes.append(f"checkpoints/{LATEST} names {latest}, but {os.path.basename(selection.path)} "
                               "is the newest checkpoint that verifies (pass --resume DIR to resume another one)")
    return selection


def find_checkpoint(root_or_dir: str) -> str | None:
    """A checkpoint directory from either a step directory or a checkpoint root (the newest one that
    verifies for rank 0); for single-process readers such as the evaluation."""
    if os.path.exists(os.path.join(root_or_dir, META)):
        return root_or_dir
    return select_checkpoint(root_or_dir, rank=0).path


def find_run_checkpoint(run_dir: str, step: int | None = None) -> str:
    """A run directory's newest complete checkpoint (or the one of `step`), for single-process readers
    (eval, export); CheckpointError naming the run and the steps it has."""
    root = checkpoint_root(run_dir)
    if step is not None:
        path = find_checkpoint(os.path.join(root, step_dir_name(step)))
        if path is None:
            have = ", ".join(reversed(committed_checkpoints(root))) or "none"
            raise CheckpointError(f"{run_dir}: no complete checkpoint for step {step} (have: {have})")
        return path
    path = find_checkpoint(root) or find_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint (train the run to the end first)")
    return path

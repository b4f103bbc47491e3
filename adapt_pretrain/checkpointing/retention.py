"""Moving checkpoints aside (never deleting them), pinning the last good one, pruning old ones."""
from __future__ import annotations

import os
import shutil
import time
from typing import Sequence

from adapt_pretrain.checkpointing.names import LATEST, PINNED, SUPERSEDED_PREFIX, atomic_write_text, step_of
from adapt_pretrain.checkpointing.selection import _first_line, committed_checkpoints


def set_aside(root: str, names: Sequence[str], why: str) -> str:
    """Move entries of `root` into a new `superseded_<time>/` folder (with WHY.txt); returns that folder.

    How checkpoints get out of the way (a rollback's newer timeline, damaged ones, a restart) without
    ever being deleted or overwritten. `latest` is re-pointed at the newest remaining checkpoint.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = os.path.join(root, f"{SUPERSEDED_PREFIX}{stamp}")
    suffix = 1
    while os.path.exists(dest):
        suffix += 1
        dest = os.path.join(root, f"{SUPERSEDED_PREFIX}{stamp}-{suffix}")
    os.makedirs(dest)
    for name in names:
        os.replace(os.path.join(root, name), os.path.join(dest, name))
    atomic_write_text(os.path.join(dest, "WHY.txt"), why.rstrip() + "\n")
    remaining = committed_checkpoints(root)
    if remaining:
        atomic_write_text(os.path.join(root, LATEST), remaining[0])
    elif os.path.exists(os.path.join(root, LATEST)):
        os.replace(os.path.join(root, LATEST), os.path.join(dest, LATEST))
    return dest


def set_aside_all(root: str, why: str) -> str | None:
    """Everything under `root` except earlier superseded folders (a deliberate restart); None if empty."""
    names = [n for n in os.listdir(root) if not n.startswith(SUPERSEDED_PREFIX)] if os.path.isdir(root) else []
    return set_aside(root, names, why) if names else None


def set_aside_newer(root: str, step: int, why: str) -> tuple[list[str], str | None]:
    """Move committed checkpoints newer than `step` aside (they belong to another timeline)."""
    newer = [n for n in committed_checkpoints(root) if (step_of(n) or 0) > step]
    return newer, (set_aside(root, newer, why) if newer else None)


def pin_checkpoint(root: str, name: str, why: str) -> None:
    """Protect `name` from pruning (one pin per root: a new pin replaces the old one)."""
    atomic_write_text(os.path.join(root, PINNED), f"{name}\n{why.rstrip()}\n")


def pinned_checkpoint(root: str) -> tuple[str | None, bool]:
    """(the pinned checkpoint's name or None, whether the pin file could be read)."""
    path = os.path.join(root, PINNED)
    if not os.path.exists(path):
        return None, True
    name = _first_line(path)
    return (name, True) if name and step_of(name) is not None else (None, False)


def prune_checkpoints(root: str, keep: int) -> list[str]:
    """Delete all but the `keep` newest committed checkpoints, sparing the pinned one; returns the deleted.

    An unreadable pin file deletes nothing (it might have protected any of them).
    """
    pinned, readable = pinned_checkpoint(root)
    if not readable:
        return []
    doomed = [n for n in committed_checkpoints(root)[max(keep, 1):] if n != pinned]
    for name in doomed:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return doomed

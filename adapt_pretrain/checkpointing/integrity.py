"""File lists and sha256 checksums: a manifest written last, verified on every rank before a resume."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

from adapt_pretrain.checkpointing.names import (
    Exchange, FORMAT_VERSION, MANIFEST, META, atomic_write_text, rank_file, read_meta, single_process)


def file_digest(path: str) -> dict[str, Any]:
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"size": os.path.getsize(path), "sha256": digest}


def describe_files(directory: str, names: Sequence[str], rank: int) -> dict[str, dict[str, Any]]:
    """Manifest entries (size, sha256, owning rank) of files `rank` wrote into `directory`."""
    return {name: {**file_digest(os.path.join(directory, name)), "rank": rank} for name in names}


def write_manifest(directory: str, step: int, files: dict[str, dict[str, Any]]) -> None:
    text = json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=1, sort_keys=True)
    atomic_write_text(os.path.join(directory, MANIFEST), text)


def _file_problem(directory: str, name: str, entry: Any) -> str | None:
    path = os.path.join(directory, name)
    if not isinstance(entry, dict):
        return f"{MANIFEST} has a malformed entry for {name}"
    if not os.path.isfile(path):
        return f"{name} is missing"
    size = os.path.getsize(path)
    if size != entry.get("size"):
        return f"{name} has {size} bytes, the manifest recorded {entry.get('size')} (truncated or replaced)"
    if file_digest(path)["sha256"] != entry.get("sha256"):
        return f"{name} does not match its recorded sha256 checksum (damaged)"
    return None


def verify_checkpoint(ckpt_dir: str, rank: int) -> list[str]:
    """Problems with the files `rank` reads from `ckpt_dir` (meta.json and its own files); [] if they verify."""
    try:
        with open(os.path.join(ckpt_dir, MANIFEST), encoding="utf-8") as fh:
            files = json.load(fh)["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}")
    except FileNotFoundError:
        return _unmanifested_problems(ckpt_dir, rank)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})"]
    if META not in files:
        return [f"{MANIFEST} lists no {META}"]
    mine = [name for name, entry in sorted(files.items())
            if name == META or (isinstance(entry, dict) and entry.get("rank") == rank)]
    return [p for p in (_file_problem(ckpt_dir, name, files[name]) for name in mine) if p]


def _unmanifested_problems(ckpt_dir: str, rank: int) -> list[str]:
    """Without a manifest only a format-1 checkpoint (written before checksums existed) is usable."""
    try:
        meta = read_meta(ckpt_dir)
    except (OSError, ValueError) as exc:
        return [f"{MANIFEST} is missing and {META} is unreadable ({type(exc).__name__}: {exc})"]
    if not isinstance(meta, dict) or meta.get("format", 1) != 1:
        return [f"{MANIFEST} is missing"]
    if not os.path.isfile(os.path.join(ckpt_dir, rank_file(rank))):
        return [f"{rank_file(rank)} is missing"]
    return []


def has_checksums(ckpt_dir: str) -> bool:
    return os.path.exists(os.path.join(ckpt_dir, MANIFEST))


def verify_everywhere(ckpt_dir: str, rank: int, exchange: Exchange = single_process) -> list[str]:
    """Every rank checks what it will read; returns every rank's problems (the same list on all ranks).

    Collective. Each problem names the ranks that saw it, so a damaged file of rank 7 is reported
    by rank 0 with "(rank 7)".
    """
    per_rank = exchange(verify_checkpoint(ckpt_dir, rank))
    ranks_of: dict[str, list[int]] = {}
    for r, problems in enumerate(per_rank):
        for problem in problems:
            ranks_of.setdefault(problem, []).append(r)
    if len(per_rank) == 1:
        return list(ranks_of)
    return [f"{problem} ({'every rank' if len(ranks) == len(per_rank) else 'rank ' + ', '.join(map(str, ranks))})"
            for problem, ranks in ranks_of.items()]

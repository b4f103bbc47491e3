"""Atomic, verified, resumable checkpoints: the run's state, plus the config and layout it belongs to.

Layout on disk (`run_dir` must be on a filesystem every node sees):
    checkpoints/step_000040/model/           model chunks, optimiser, scheduler: a sharded megatron
                                             checkpoint, readable by any layout (megatron/dist_ckpt.py)
    checkpoints/step_000040/run/             ADAPT engine, data cursors, RNG, loop counters
                                             (megatron/run_state.py)
    checkpoints/step_000040/meta.json        step, config, parallel layout (rank 0)
    checkpoints/step_000040/manifest.json    size and sha256 of every file above, written last
    checkpoints/latest                       name of the newest committed checkpoint (a hint only)
    checkpoints/pinned                       the last checkpoint before the latest non-finite streak
    checkpoints/superseded_<time>/           checkpoints moved out of the way (rollback, damage, restart)
A checkpoint is written into `step_N.tmp/` and renamed only after every rank has finished, so a crash
mid-save leaves the previous checkpoint intact. Resuming scans the step folders newest first and takes
the first one whose files match their checksums on every rank, so an empty, damaged or stale `latest`
or a damaged newest checkpoint costs at most the steps since the previous one, never the run. Nothing
here deletes a checkpoint except `prune_checkpoints` (keep_checkpoints), which spares the pinned one.
The integrity functions work on file lists and checksums, not on what the files hold, so they stay
valid whatever serialises a rank's state (`write_rank_state` is the only part that knows; legacy
checkpoints held one `rank_NNNNN.pt` per rank instead). Each file's manifest entry names the rank that
reported it, which is the rank that verifies it on resume.
Resuming compares the saved config and layout with the current ones and refuses any difference that
would silently change the run (different model, data, global batch), naming each field; the parallel
layout itself may change.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

FORMAT_VERSION = 2  # 2: manifest.json with per-file checksums; 1: no manifest (loaded unverified)
LATEST, META, MANIFEST, PINNED = "latest", "meta.json", "manifest.json", "pinned"
SUPERSEDED_PREFIX = "superseded_"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# Config fields that may change between a run and its resume without changing what is computed.
# data.data_dir may move: the data stream checks the manifest's content hash itself on resume.
# prepare.* only acts when the data dir has no manifest, which a resumable run always has.
SAFE_TO_CHANGE = (
    "train.steps", "train.log_interval", "train.checkpoint_interval", "train.keep_checkpoints",
    "train.stop_at_step", "train.progress_bar", "train.max_nonfinite_in_row", "train.run_dir",
    "train.collective_timeout_s", "train.watchdog",
    "wandb.", "data.prefetch_factor", "data.verify_checksums", "data.data_dir", "prepare.",
    # the layout: model and optimiser are resharded, the data stream is redistributed; what must
    # stay is the global batch, checked separately (`layout_problems`)
    "parallel.", "data.num_workers", "train.global_batch_size", "train.gradient_accumulation_steps",
    # runtime values that older checkpoints stored in the config (now derived from the layout)
    "data.dp_rank", "data.dp_size",
)
# Fields that may change on resume only when the user names them (`--allow-change`); each change is
# logged. The optimiser's settings change how the run continues, not what the saved state means.
CHANGE_WITH_CONSENT = ("optim.",)

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


# ----- integrity: file lists and checksums --------------------------------------------------------

def file_digest(path: str) -> dict[str, Any]:
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"size": os.path.getsize(path), "sha256": digest}


def describe_files(directory: str, names: Sequence[str], rank: int) -> dict[str, dict[str, Any]]:
    """Manifest entries (size, sha256, owning rank) of files `rank` wrote into `directory`."""
    return {name: {**file_digest(os.path.join(directory, name)), "rank": rank} for name in names}


def write_manifest(directory: str, step: int, files: dict[str, dict[str, Any]]) -> None:
    text = json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=1, sort_keys=True)
    _atomic_write_text(os.path.join(directory, MANIFEST), text)


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


# ----- finding the checkpoint to resume --------------------------------------------------------------

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


# ----- moving aside, pinning, pruning ----------------------------------------------------------------

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
    _atomic_write_text(os.path.join(dest, "WHY.txt"), why.rstrip() + "\n")
    remaining = committed_checkpoints(root)
    if remaining:
        _atomic_write_text(os.path.join(root, LATEST), remaining[0])
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
    _atomic_write_text(os.path.join(root, PINNED), f"{name}\n{why.rstrip()}\n")


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


# ----- save ---------------------------------------------------------------------------------------

def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
    _atomic_write_text(os.path.join(tmp, META),
                       json.dumps({**meta, "step": step, "format": FORMAT_VERSION, "time": time.time()},
                                  indent=1, sort_keys=True, default=str))
    write_manifest(tmp, step, {**files, **describe_files(tmp, [META], rank=0)})
    if os.path.exists(final):  # only after a rollback left it behind: move it, never overwrite it
        set_aside(root, [os.path.basename(final)], f"replaced by a new save of step {step}")
    os.replace(tmp, final)
    _atomic_write_text(os.path.join(root, LATEST), step_dir_name(step))


# ----- load ---------------------------------------------------------------------------------------

def read_meta(ckpt_dir: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, META), encoding="utf-8") as fh:
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


def _matches(key: str, patterns: Sequence[str]) -> bool:
    """`key` is one of `patterns` or under one ending in '.' (a whole section or subsection)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def changed_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint value, current value) for every flattened config field that differs."""
    old = _flatten(json.loads(json.dumps(saved, default=str)))
    new = _flatten(json.loads(json.dumps(current, default=str)))
    return [(key, old.get(key, "<absent>"), new.get(key, "<absent>")) for key in sorted(set(old) | set(new))
            if old.get(key, "<absent>") != new.get(key, "<absent>")]


def consent_problems(allow: Sequence[str]) -> list[str]:
    """The `--allow-change` entries that are not fields which may change with consent."""
    return [f for f in allow if not _matches(f, CHANGE_WITH_CONSENT) and f.rstrip("*") not in CHANGE_WITH_CONSENT]


def _allowed(allow: Sequence[str]) -> tuple[str, ...]:
    return tuple(f.rstrip("*") for f in allow)  # "optim.*" and "optim." mean the whole section


def config_differences(saved: dict[str, Any], current: dict[str, Any], allow: Sequence[str] = ()) -> list[str]:
    """Unsafe differences between two config dicts, as 'field: saved -> current' lines."""
    return [f"  {key}: {a!r} (checkpoint) -> {b!r} (now)" for key, a, b in changed_fields(saved, current)
            if not _matches(key, SAFE_TO_CHANGE) and not _matches(key, _allowed(allow))]


def consented_changes(saved: dict[str, Any], current: dict[str, Any],
                      allow: Sequence[str]) -> list[tuple[str, Any, Any]]:
    """The differences the user allowed with `--allow-change` (to be applied and logged)."""
    return [(key, a, b) for key, a, b in changed_fields(saved, current)
            if not _matches(key, SAFE_TO_CHANGE) and _matches(key, _allowed(allow))]


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


def check_resume_compatible(meta: dict[str, Any], config: dict[str, Any], layout: dict[str, Any],
                            allow: Sequence[str] = ()) -> None:
    """Raise CheckpointError naming every unsafe change between the checkpoint and this run."""
    problems: list[str] = layout_problems(meta.get("layout", {}), layout)
    cfg_diff = config_differences(meta.get("config", {}), config, allow)
    if cfg_diff:
        problems.append("the config changed in fields that alter the run:\n" + "\n".join(cfg_diff))
    if problems:
        safe = ", ".join(s.rstrip(".") + ("*" if s.endswith(".") else "") for s in SAFE_TO_CHANGE)
        consent = ", ".join(s.rstrip(".") + ("*" if s.endswith(".") else "") for s in CHANGE_WITH_CONSENT)
        raise CheckpointError(
            f"cannot resume from checkpoint at step {meta.get('step')}:\n" + "\n".join(problems)
            + f"\nFields that may change on resume: {safe}. Fields that may change when named in "
              f"--allow-change (e.g. --allow-change optim.lr,optim.min_lr; logged): {consent}. "
              "Start a new run_dir to train with a different setup.", same_on_every_rank=True)


__all__ = ["CheckpointError", "SAFE_TO_CHANGE", "CHANGE_WITH_CONSENT", "Selection", "save_checkpoint",
           "select_checkpoint", "find_checkpoint", "verify_checkpoint", "verify_everywhere", "read_meta",
           "load_rank_state", "check_resume_compatible", "config_differences", "consented_changes",
           "consent_problems", "layout_problems", "same_layout", "set_aside", "set_aside_all", "set_aside_newer",
           "pin_checkpoint", "pinned_checkpoint", "prune_checkpoints", "rng_state", "set_rng_state",
           "write_rank_state"]

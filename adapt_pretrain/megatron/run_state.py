"""A trainer's whole state in one checkpoint directory, written so that any layout can read it.

    model/   model chunks, optimiser, LR scheduler: a sharded checkpoint (`dist_ckpt`)
    run/     the rest, small and written once by the ranks that own it (no copy per tensor- or
             pipeline-parallel rank):

    engine.pt               ADAPT engine state (identical on every rank; rank 0 writes it) without
                            the kept unit embeddings, which are per data-parallel replica:
    engine_units_dpNNNNN.pt the last stage's kept group embeddings of DP replica N (TP rank 0
                            writes; every TP rank holds the same ones). On load, DP rank r of D takes
                            the files r, r + D, ...: the rows over all ranks stay the same multiset,
                            which is all their one use needs (the standardisation statistics
                            re-estimated at an anchor refresh are sums over every rank's rows).
    data_dpNNNNN.json       the data stream state of DP replica N (TP = PP = 0 writes); a resume
                            with a different DP size or worker count redistributes the streams
                            (`DataStream.load_state_dict` with every replica's state).
    rng_rankNNNNN.pt        every rank's RNG streams; restored only when the layout is unchanged
                            (they belong to one rank's position in one layout; with dropout 0, the
                            default, nothing random happens in a step).
    loop.json               the loop counters (identical on every rank; rank 0 writes them).
`save_trainer_state` / `load_trainer_state` are the two calls a trainer makes.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

ENGINE_FILE = "engine.pt"
LOOP_FILE = "loop.json"


UNITS = ("engine_units_dp", ".pt")
DATA = ("data_dp", ".json")
RNG = ("rng_rank", ".pt")


def _name(kind: tuple[str, str], index: int) -> str:
    return f"{kind[0]}{index:05d}{kind[1]}"


def units_file(dp_rank: int) -> str:
    return _name(UNITS, dp_rank)


def data_file(dp_rank: int) -> str:
    return _name(DATA, dp_rank)


def rng_file(rank: int) -> str:
    return _name(RNG, rank)


def _indexed(directory: str, kind: tuple[str, str]) -> list[str]:
    """The files of one kind, by index; raises if the indices are not exactly 0..n-1."""
    regex = re.compile(re.escape(kind[0]) + r"(\d+)" + re.escape(kind[1]))
    found = sorted((int(m.group(1)), name) for name in os.listdir(directory) if (m := regex.fullmatch(name)))
    indices = [i for i, _ in found]
    if not indices or indices != list(range(len(indices))):
        raise FileNotFoundError(f"{directory}: {kind[0]}N{kind[1]} files are not numbered 0..n-1 (found {indices}): "
                                "the checkpoint is incomplete")
    return [os.path.join(directory, name) for _, name in found]


def _write(path: str, obj: Any) -> None:
    tmp = f"{path}.part"
    if path.endswith(".json"):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


# ----- ADAPT engine -------------------------------------------------------------------------------

def save_engine(directory: str, engine: Any, rank: int, dp_rank: int, tp_rank: int, is_last_stage: bool) -> list[str]:
    state = engine.state_dict()
    units = state.pop("previous_units")
    names = ([ENGINE_FILE] if rank == 0 else []) + ([units_file(dp_rank)] if is_last_stage and tp_rank == 0 else [])
    for name in names:
        _write(os.path.join(directory, name), state if name == ENGINE_FILE else units)
    return names


def load_engine(directory: str, engine: Any, dp_rank: int, dp_size: int, is_last_stage: bool) -> None:
    state = torch.load(os.path.join(directory, ENGINE_FILE), map_location="cpu", weights_only=False)
    units: Optional[torch.Tensor] = None
    if is_last_stage:
        parts = [torch.load(path, map_location="cpu") for path in _indexed(directory, UNITS)[dp_rank::dp_size]]
        parts = [p for p in parts if p is not None]
        units = torch.cat(parts) if parts else None
    engine.load_state_dict({**state, "previous_units": units})


# ----- data stream --------------------------------------------------------------------------------

def save_data(directory: str, loader: Any, dp_rank: int, tp_rank: int, pp_rank: int) -> list[str]:
    if tp_rank or pp_rank:
        return []
    _write(os.path.join(directory, data_file(dp_rank)), loader.state_dict())
    return [data_file(dp_rank)]


def read_data_states(directory: str) -> list[dict[str, Any]]:
    """Every data-parallel replica's data stream state, by DP rank."""
    out = []
    for path in _indexed(directory, DATA):
        with open(path, encoding="utf-8") as fh:
            out.append(json.load(fh))
    return out


def _data_state_for(directory: str, loader: Any, dp_rank: int, dp_size: int) -> Any:
    """This replica's own saved state when the data layout is unchanged (one file read per rank), else
    every replica's, for the loader to redistribute."""
    own = os.path.join(directory, data_file(dp_rank))
    if os.path.isfile(own):
        with open(own, encoding="utf-8") as fh:
            state = json.load(fh)
        if state.get("dp_size") == dp_size and state.get("num_workers") == loader.cfg.num_workers:
            return state
    return read_data_states(directory)


# ----- RNG ----------------------------------------------------------------------------------------

def save_rng(directory: str, state: dict[str, Any], rank: int) -> list[str]:
    _write(os.path.join(directory, rng_file(rank)), state)
    return [rng_file(rank)]


def load_rng(directory: str, rank: int) -> dict[str, Any]:
    return torch.load(os.path.join(directory, rng_file(rank)), map_location="cpu", weights_only=False)


def expected_files(world_size: int, dp_size: int) -> list[str]:
    """Every file a complete run-state directory of this layout holds."""
    return ([ENGINE_FILE, LOOP_FILE] + [units_file(d) for d in range(dp_size)] + [data_file(d) for d in range(dp_size)]
            + [rng_file(r) for r in range(world_size)])


# ----- the whole trainer state ----------------------------------------------------------------------

@dataclass
class TrainerParts:
    """What a checkpoint holds of a trainer (the trainer passes its own objects)."""

    chunks: list
    optimizer: Any
    scheduler: Any
    engine: Any
    loader: Any
    info: Any  # ParallelInfo


def checkpoint_files(world_size: int, dp_size: int) -> list[str]:
    """Files (relative to a step directory) that prove a complete save: the sharded checkpoint's
    metadata (written last, after every shard) and every run-state file."""
    from adapt_pretrain.megatron.dist_ckpt import RUN_STATE_SUBDIR, SHARDED_SUBDIR

    return [f"{SHARDED_SUBDIR}/metadata.json"] + [f"{RUN_STATE_SUBDIR}/{n}" for n in expected_files(world_size, dp_size)]


def save_trainer_state(directory: str, parts: TrainerParts, loop: dict[str, Any], rng: dict[str, Any],
                       checkpointer: Any = None) -> list[str]:
    """Collective: write every part into `directory` (a temporary step directory). Returns the files
    this rank wrote (rank 0 also lists the sharded checkpoint's, which several ranks wrote)."""
    from adapt_pretrain.megatron.dist_ckpt import RUN_STATE_SUBDIR, SHARDED_SUBDIR, ShardedCheckpointer

    info = parts.info
    (checkpointer or ShardedCheckpointer()).save(os.path.join(directory, SHARDED_SUBDIR), parts.chunks,
                                                 parts.optimizer, parts.scheduler)
    run = os.path.join(directory, RUN_STATE_SUBDIR)
    os.makedirs(run, exist_ok=True)
    names = save_engine(run, parts.engine, info.rank, info.dp_rank, info.tp_rank, info.is_last_stage)
    names += save_data(run, parts.loader, info.dp_rank, info.tp_rank, info.pp_rank)
    names += save_rng(run, rng, info.rank)
    if info.rank == 0:
        _write(os.path.join(run, LOOP_FILE), loop)
        names.append(LOOP_FILE)
    mine = [f"{RUN_STATE_SUBDIR}/{n}" for n in names]
    if info.rank == 0:
        sharded = os.path.join(directory, SHARDED_SUBDIR)
        mine += [f"{SHARDED_SUBDIR}/{n}" for n in sorted(os.listdir(sharded))]
    return mine


def load_trainer_state(directory: str, parts: TrainerParts, restore_rng: bool) -> tuple[dict[str, Any], Optional[dict]]:
    """Collective: load a step directory written under any layout into `parts`; returns the loop
    counters and this rank's RNG state (None unless `restore_rng`: the layout is unchanged)."""
    from adapt_pretrain.megatron.dist_ckpt import RUN_STATE_SUBDIR, SHARDED_SUBDIR, load_sharded

    info = parts.info
    load_sharded(os.path.join(directory, SHARDED_SUBDIR), parts.chunks, parts.optimizer, parts.scheduler)
    run = os.path.join(directory, RUN_STATE_SUBDIR)
    load_engine(run, parts.engine, info.dp_rank, info.dp_size, info.is_last_stage)
    parts.loader.load_state_dict(_data_state_for(run, parts.loader, info.dp_rank, info.dp_size))
    with open(os.path.join(run, LOOP_FILE), encoding="utf-8") as fh:
        loop = json.load(fh)
    return loop, (load_rng(run, info.rank) if restore_rng else None)


__all__ = ["ENGINE_FILE", "LOOP_FILE", "TrainerParts", "checkpoint_files", "data_file", "expected_files",
           "load_engine", "load_rng", "load_trainer_state", "read_data_states", "rng_file", "save_data", "save_engine",
           "save_rng", "save_trainer_state", "units_file"]

"""The run state that lives beside a sharded checkpoint, written so that any layout can read it.

Model and optimiser go through `dist_ckpt`; what is left is small and written once, by the ranks
that own it (no copy per tensor- or pipeline-parallel rank):

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
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import torch

ENGINE_FILE = "engine.pt"


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

def save_engine(directory: str, engine: Any, rank: int, dp_rank: int, tp_rank: int, is_last_stage: bool) -> None:
    state = engine.state_dict()
    units = state.pop("previous_units")
    if rank == 0:
        _write(os.path.join(directory, ENGINE_FILE), state)
    if is_last_stage and tp_rank == 0:
        _write(os.path.join(directory, units_file(dp_rank)), units)


def load_engine(directory: str, engine: Any, dp_rank: int, dp_size: int, is_last_stage: bool) -> None:
    state = torch.load(os.path.join(directory, ENGINE_FILE), map_location="cpu", weights_only=False)
    units: Optional[torch.Tensor] = None
    if is_last_stage:
        parts = [torch.load(path, map_location="cpu") for path in _indexed(directory, UNITS)[dp_rank::dp_size]]
        parts = [p for p in parts if p is not None]
        units = torch.cat(parts) if parts else None
    engine.load_state_dict({**state, "previous_units": units})


# ----- data stream --------------------------------------------------------------------------------

def save_data(directory: str, loader: Any, dp_rank: int, tp_rank: int, pp_rank: int) -> None:
    if tp_rank == 0 and pp_rank == 0:
        _write(os.path.join(directory, data_file(dp_rank)), loader.state_dict())


def read_data_states(directory: str) -> list[dict[str, Any]]:
    """Every data-parallel replica's data stream state, by DP rank."""
    out = []
    for path in _indexed(directory, DATA):
        with open(path, encoding="utf-8") as fh:
            out.append(json.load(fh))
    return out


# ----- RNG ----------------------------------------------------------------------------------------

def save_rng(directory: str, state: dict[str, Any], rank: int) -> None:
    _write(os.path.join(directory, rng_file(rank)), state)


def load_rng(directory: str, rank: int) -> dict[str, Any]:
    return torch.load(os.path.join(directory, rng_file(rank)), map_location="cpu", weights_only=False)


def expected_files(world_size: int, dp_size: int) -> list[str]:
    """Every file a complete run-state directory of this layout holds."""
    return ([ENGINE_FILE] + [units_file(d) for d in range(dp_size)] + [data_file(d) for d in range(dp_size)]
            + [rng_file(r) for r in range(world_size)])


__all__ = ["ENGINE_FILE", "data_file", "expected_files", "load_engine", "load_rng", "read_data_states", "rng_file",
           "save_data", "save_engine", "save_rng", "units_file"]

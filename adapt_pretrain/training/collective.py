"""Small collectives the trainer's parts share: verdict exchange, rank-0 file actions, rank-0 notes.

Every rank calls `exchange` and `on_rank0` at the same point; they carry a verdict so all ranks
raise together instead of the healthy ones waiting forever at the next collective.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist

from adapt_pretrain.checkpointing import CheckpointError
from adapt_pretrain.logs import get_logger

log = get_logger(__name__)


def exchange(obj: Any) -> list[Any]:
    """All-gather of a small picklable object over every rank (a barrier that carries verdicts)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def say(rank: int, message: str) -> None:
    """A note every rank reached alike, shown once (rank 0) on stderr."""
    if rank == 0:
        log.info(message)


def on_rank0(rank: int, action: Callable[[], Any], what: str) -> Any:
    """Run a filesystem action on rank 0; every rank raises if it failed (collective).

    `what` names the directory being rearranged, for the message.
    """
    result, error = None, ""
    if rank == 0:
        try:
            result = action()
        except OSError as exc:
            error = f"rank 0: {exc}"
    errors = [e for e in exchange(error) if e]
    if errors:
        raise CheckpointError(f"cannot rearrange {what}: {errors[0]}", same_on_every_rank=True)
    return result

"""Process groups and RNG for a (TP, PP, DP, VP) layout: `setup_parallel` / `teardown_parallel`.

One call does everything order-sensitive: torch.distributed from the launcher's environment
(gloo on CPU, NCCL on GPU; a single process without a launcher gets a 1-rank group so the same code
path runs everywhere), the CPU compatibility layer, megatron's parallel_state, and seeding.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from adapt_pretrain.deepspeed.launcher import DEFAULT_COLLECTIVE_TIMEOUT_S
from adapt_pretrain.layout import data_parallel_size
from adapt_pretrain.megatron import cpu_compat
from adapt_pretrain.megatron.config import ParallelConfig


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's coordinates in the layout (all plain ints/bools, cheap to log), read from megatron's
    parallel_state; the sizes are the planned `adapt_pretrain.layout.Layout`'s."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    vp_size: int
    is_first_stage: bool
    is_last_stage: bool
    device: str
    cpu_compat: bool

    @property
    def is_logging_rank(self) -> bool:
        """The rank that holds final results of DP replica 0: last stage, TP rank 0."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0


class PortInUseError(RuntimeError):
    """The launcher's MASTER_PORT is taken by another process on the master host."""


def _init_process_group(timeout_s: float) -> bool:
    """Initialise torch.distributed from env (torchrun/deepspeed launcher) or as one process.

    Under a launcher (WORLD_SIZE set) the group meets at the launcher's MASTER_ADDR:MASTER_PORT. A
    process on its own gets a 1-rank group whose store listens on a port the kernel picks while
    binding (no probe-then-bind race), so any number of evals and training runs share a host; the
    environment is left untouched. Returns True when this call created the group (so teardown may
    destroy it)."""
    if dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    backend = "nccl" if cuda else "gloo"
    if "WORLD_SIZE" not in os.environ:
        store = dist.TCPStore("127.0.0.1", 0, 1, True)  # port 0: bound to a free port atomically
        dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return True
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except dist.DistNetworkError as exc:
        if "address already in use" not in str(exc).lower() and "eaddrinuse" not in str(exc).lower():
            raise
        raise PortInUseError(f"MASTER_PORT={os.environ.get('MASTER_PORT')} on {os.environ.get('MASTER_ADDR')} is already "
                           "in use (another job on this host?): launch with a free --master_port / MASTER_PORT") from exc
    return True


_OWNS_GROUP = False


def setup_parallel(parallel: ParallelConfig, seed: int,
                   timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> ParallelInfo:
    """Initialise distributed + megatron parallel_state for `parallel`; seed all RNGs.

    `timeout_s` bounds every collective of megatron's groups (and of the default group if this call
    creates it): a stopped rank fails the job in minutes, not megatron's default half hour.

    Seeding: torch's CPU generator gets `seed` on every rank (megatron's CPU initialisation then
    gives identical full weights on every TP rank before sharding); on GPU megatron's tracker gets
    `seed` (+ a TP offset for TP-region dropout) via model_parallel_cuda_manual_seed.
    """
    global _OWNS_GROUP
    from megatron.core import parallel_state as ps

    _OWNS_GROUP = _init_process_group(timeout_s) or _OWNS_GROUP
    compat = cpu_compat.activate()
    data_parallel_size(parallel, dist.get_world_size())  # a clear ConfigError before megatron asserts
    if torch.cuda.is_available():  # also when a launcher (deepspeed) initialised the group already
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        distributed_timeout_minutes=timeout_s / 60.0,
    )
    torch.manual_seed(seed)
    if not compat:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return parallel_info(compat)


def parallel_info(compat: bool | None = None) -> ParallelInfo:
    """Snapshot of this rank's coordinates (parallel_state must be initialised)."""
    from megatron.core import parallel_state as ps

    vp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        vp_size=vp,
        is_first_stage=ps.is_pipeline_first_stage(ignore_virtual=True),
        is_last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
        device="cuda" if torch.cuda.is_available() else "cpu",
        cpu_compat=cpu_compat.is_active() if compat is None else compat,
    )


def teardown_parallel() -> None:
    """Destroy megatron's groups, and the default group if setup_parallel created it."""
    global _OWNS_GROUP
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if _OWNS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_GROUP = False

"""Read what a launcher (deepspeed, torchrun, SLURM srun, or nothing) tells a process about its place.

The training script must run unchanged under `deepspeed --num_gpus N`, the multi-node
`--no_ssh --node_rank R --master_addr A` form, torchrun and as a plain process. Those launchers
agree on the env variables RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, except that
deepspeed also appends `--local_rank=N` to the script's arguments and SLURM (srun without a
launcher) only sets SLURM_* variables. This module turns all of that into one `DistEnv` and
initialises the default process group (NCCL on GPUs, gloo on CPU).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

# Seconds a collective may wait before it fails: minutes, not torch's 30-minute default, so a stopped
# or dead rank ends the job soon (the trainer takes it from train.collective_timeout_s).
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # deepspeed | torchrun | slurm | none

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def strip_local_rank(argv: list[str]) -> tuple[list[str], int | None]:
    """Remove deepspeed's `--local_rank=N` / `--local_rank N` from argv; return (rest, N or None)."""
    rest: list[str] = []
    local_rank: int | None = None
    skip = False
    for i in range(len(argv)):
        if skip:
            skip = False
            continue
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            local_rank = int(arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            local_rank = int(argv[i + 1])
            skip = True
        else:
            rest.append(arg)
    return rest, local_rank


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def read_dist_env(local_rank_arg: int | None = None) -> DistEnv:
    """Build a DistEnv from the environment; `local_rank_arg` is deepspeed's `--local_rank` value."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if "TORCHELASTIC_RUN_ID" in os.environ:
            launcher = "torchrun"
        elif local_rank_arg is not None or "CROSS_RANK" in os.environ:
            launcher = "deepspeed"
        else:
            launcher = "env"
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0)
        local_world = _env_int("LOCAL_WORLD_SIZE")
        if local_world is None:  # deepspeed's launch.py does not export it; infer from the GPU list
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            local_world = len(visible.split(",")) if visible and launcher == "deepspeed" else 1
        return DistEnv(rank, world, local_rank, max(local_world, 1),
                       os.environ.get("MASTER_ADDR", "127.0.0.1"), _env_int("MASTER_PORT", 29500), launcher)
    if "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", 1) > 1:
        nodelist = os.environ.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1"
        return DistEnv(_env_int("SLURM_PROCID", 0), _env_int("SLURM_NTASKS", 1), _env_int("SLURM_LOCALID", 0),
                       _env_int("SLURM_NTASKS_PER_NODE", 1) or 1,
                       os.environ.get("MASTER_ADDR", nodelist), _env_int("MASTER_PORT", 29500), "slurm")
    return DistEnv(local_rank=local_rank_arg or 0)


def configure_threads(env: DistEnv) -> int:
    """Split CPU cores between the processes of one node (unless OMP_NUM_THREADS says otherwise).

    Without this, N CPU processes each start one thread per core and oversubscribe the machine,
    which makes a 2-process CPU run several times slower than it needs to be.
    """
    if torch.cuda.is_available():
        return torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        threads = max(1, (os.cpu_count() or 1) // max(env.local_world_size, 1))
    torch.set_num_threads(threads)
    return threads


def init_distributed(env: DistEnv, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> str:
    """Initialise torch.distributed if the launcher started several processes; return the backend.

    Also initialises a 1-process gloo group for a plain run, because the parallel-state code and the
    collectives in the trainer are then the same in every mode. `timeout_s` bounds every collective
    of the default group (and the rendezvous).
    """
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if dist.is_initialized():
        return dist.get_backend()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % max(torch.cuda.device_count(), 1))
    if env.distributed:
        init_method = f"tcp://{env.master_addr}:{env.master_port}"
    else:  # a plain run: any free local port, so two plain runs on one machine do not collide
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, init_method=init_method,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return backend


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


__all__ = ["DistEnv", "strip_local_rank", "read_dist_env", "configure_threads", "init_distributed",
           "DEFAULT_COLLECTIVE_TIMEOUT_S"]

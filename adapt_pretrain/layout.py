"""`Layout`: how one run's processes are arranged, planned once from the config and the launcher's world size.

The data-parallel size is never a user setting: it is world_size / (tensor * pipeline). The plan is
checked before any process group exists, and checkpoints store `as_dict()` as their meta "layout"
(a resume compares it to decide whether to reshard). `megatron.parallel.ParallelInfo` is the other
half: this rank's coordinates inside the planned layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapt_pretrain.config.base import ConfigError


def micro_batches_per_step(train: Any, dp: int) -> int:
    """Micro-batches per step on each data-parallel rank: train.global_batch_size / (micro_batch_size * dp),
    or train.gradient_accumulation_steps (default 1) when no global batch is given; ConfigError when they
    do not divide or contradict each other."""
    if train.global_batch_size is None:
        return train.gradient_accumulation_steps or 1
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} must be a multiple of "
            f"train.micro_batch_size * data-parallel size = {train.micro_batch_size} * {dp} = {per_step}")
    gas = train.global_batch_size // per_step
    if train.gradient_accumulation_steps is not None and train.gradient_accumulation_steps != gas:
        raise ConfigError(
            f"train.gradient_accumulation_steps={train.gradient_accumulation_steps} contradicts "
            f"train.global_batch_size={train.global_batch_size} (micro_batch_size={train.micro_batch_size}, "
            f"dp={dp} gives {gas}); set only one of them")
    return gas


def data_parallel_size(parallel: Any, world_size: int) -> int:
    """world_size / (parallel.tensor * parallel.pipeline); ConfigError when it does not divide."""
    tp, pp = parallel.tensor, parallel.pipeline
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor * parallel.pipeline "
                          f"= {tp} * {pp}")
    return world_size // (tp * pp)


@dataclass(frozen=True)
class Layout:
    """The whole run's layout: process counts per dimension and the micro-batching of one step."""

    world_size: int
    tp: int
    pp: int
    vp: int
    dp: int
    micro_batch_size: int
    num_microbatches: int

    @classmethod
    def plan(cls, parallel: Any, train: Any, world_size: int) -> "Layout":
        """The layout of `world_size` processes for a ParallelConfig and a TrainConfig; ConfigError naming
        the field when the world size or the global batch does not divide."""
        dp = data_parallel_size(parallel, world_size)
        return cls(world_size=world_size, tp=parallel.tensor, pp=parallel.pipeline,
                   vp=int(parallel.virtual_pipeline or 1), dp=dp, micro_batch_size=train.micro_batch_size,
                   num_microbatches=micro_batches_per_step(train, dp))

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimiser step over all data-parallel ranks."""
        return self.dp * self.num_microbatches * self.micro_batch_size

    def as_dict(self) -> dict[str, int]:
        """Plain dict, as checkpoints store it (meta "layout") and metrics log it."""
        return {"world_size": self.world_size, "tp": self.tp, "pp": self.pp, "vp": self.vp, "dp": self.dp,
                "micro_batch_size": self.micro_batch_size, "num_microbatches": self.num_microbatches}


__all__ = ["Layout", "data_parallel_size", "micro_batches_per_step"]

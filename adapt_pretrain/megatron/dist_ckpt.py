"""Model, optimiser and LR-scheduler state through megatron-core `dist_checkpointing` (torch_dist).

Why: a per-rank `torch.save` writes every data-parallel replica's copy of the same model shard
again and ties the checkpoint to one (TP, PP, DP) layout. Here every tensor is described by its
place in the *global* tensor (megatron's `sharded_state_dict`), so
- each shard is written once: replicas are deduplicated, and with `fully_parallel_save` the
  writing is spread evenly over the data-parallel ranks (each writes a disjoint part);
- a checkpoint loads into any layout: each rank reads exactly the slices its parameters need
  (megatron splits SwiGLU's [gate; up] and the per-query-group QKV itself);
- the save can run in a background process (`async_save`): `ShardedCheckpointer.finalize`.

Optimiser: the plain megatron optimiser (fp32, what CPU runs use) stores Adam's moments as
tensors shaped like their parameters, sharded like them. The distributed optimiser (GPU) is saved
in the `fully_sharded_model_space` format, which is reshardable over TP, PP and DP (megatron's
default `dp_reshardable` only reshards over DP). That GPU path is coded but only the fp32 path is
tested here (CPU machines; the distributed optimiser refuses CPU tensors).

The scheduler's state (identical on every rank) goes into the checkpoint's common part (rank 0).
Everything else a resume needs (ADAPT engine, data cursors, RNG, counters) is written beside this
directory by the trainer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from adapt_pretrain.megatron.model import unwrap

# inside a checkpoint's step directory: the sharded model/optimiser state and the run state files
SHARDED_SUBDIR = "model"
RUN_STATE_SUBDIR = "run"
# keys of the top-level state dict handed to dist_checkpointing
SCHEDULER_KEY = "scheduler"
OPTIMIZER_KEY = "optimizer"
OPTIMIZER_SHARDING = "fully_sharded_model_space"  # reshardable over TP, PP and DP (distributed optimiser)


class ShardedCheckpointError(RuntimeError):
    """A sharded checkpoint is missing, incomplete, or does not fit the model being loaded."""


@dataclass
class ShardedCheckpointOptions:
    """How `ShardedCheckpointer` writes.

    fully_parallel_save: spread the writing of each deduplicated shard over the data-parallel
        ranks (otherwise the first replica writes all of its shards, the others nothing).
    async_save: write in a background process; the caller must `finalize()` (collective).
    thread_count: writer threads per rank (files per rank).
    """

    fully_parallel_save: bool = True
    async_save: bool = False
    thread_count: int = 1


def _metadata() -> dict[str, Any]:
    """The sharding metadata megatron uses for new checkpoints (layout-independent keys)."""
    return {"distrib_optim_sharding_type": OPTIMIZER_SHARDING, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


def model_key(index: int) -> str:
    return f"model{index}"


def model_sharded_state_dict(chunks: list[nn.Module]) -> dict[str, Any]:
    """{'model0': ..., 'model1': ...}: one sharded dict per model chunk, global tensor coordinates."""
    metadata = _metadata()
    return {model_key(i): unwrap(c).sharded_state_dict(metadata=metadata) for i, c in enumerate(chunks)}


def _ensure_optimizer_state(optimizer: Any) -> None:
    """Give every parameter Adam's fresh state (zero moments, step 0) if it has none yet.

    A checkpoint taken before the first successful update would otherwise hold no moments, and a
    load (which allocates them) would leave torch's Adam without its `step`; zero moments at step 0
    are exactly what Adam starts from."""
    from adapt_pretrain.megatron.optim import _inner_optimizers

    for inner in _inner_optimizers(optimizer):
        torch_opt, init = getattr(inner, "optimizer", None), getattr(inner, "init_state_fn", None)
        if not isinstance(torch_opt, torch.optim.Optimizer) or init is None:
            continue
        if all(len(torch_opt.state[p]) for group in torch_opt.param_groups for p in group["params"]):
            continue
        init(torch_opt, getattr(inner, "config", None))
        for group in torch_opt.param_groups:
            for p in group["params"]:
                torch_opt.state[p].setdefault("step", torch.tensor(0.0))


def _restore_zero_step(optimizer_state: Any) -> None:
    """megatron saves Adam's shared step only when it is truthy (`if step:`), so a checkpoint taken
    before the first update has none; give such states their step 0 back before loading."""
    if isinstance(optimizer_state, dict) and isinstance(optimizer_state.get("state"), dict):
        states = optimizer_state["state"]
        if "common_step" not in states and any("step" not in v for v in states.values() if isinstance(v, dict)):
            states["common_step"] = torch.tensor(0.0)
    elif isinstance(optimizer_state, dict) and all(isinstance(k, int) for k in optimizer_state):
        # a chain of several optimisers: {index: state}
        for value in optimizer_state.values():
            _restore_zero_step(value)


def _sharded_state_dict(chunks: list[nn.Module], optimizer: Any, scheduler: Any, with_optimizer: bool,
                        is_loading: bool) -> dict[str, Any]:
    state = model_sharded_state_dict(chunks)
    if with_optimizer:
        if not is_loading:
            _ensure_optimizer_state(optimizer)
        # is_loading=True initialises Adam's state so there are tensors to load into; only do that when
        # the dict is then really loaded (an initialised but unused state breaks the next step)
        state[OPTIMIZER_KEY] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=_metadata())
        state[SCHEDULER_KEY] = scheduler.state_dict()
    return state


def _save_strategy(options: ShardedCheckpointOptions):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=options.thread_count)
    if options.fully_parallel_save and ps.get_data_parallel_world_size() > 1:
        # the structure never changes between saves of one run (Adam's state is created before the
        # first one), so the split of the writing is computed once and reused
        strategy = FullyParallelSaveStrategyWrapper(strategy, ps.get_data_parallel_group(), do_cache_distribution=True)
    return strategy


def _load_strategy(directory: str):
    """Plain torch_dist load on CPU; on GPU the data-parallel ranks split the reading and exchange
    (megatron's fully parallel load moves tensors with `.cuda()`, which CPU runs cannot do)."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy

    strategy = get_default_load_sharded_strategy(directory)
    if torch.cuda.is_available():
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

        if ps.get_data_parallel_world_size() > 1:
            strategy = FullyParallelLoadStrategyWrapper(strategy, ps.get_data_parallel_group())
    return strategy


@dataclass
class _Pending:
    call_index: int
    on_done: Optional[Callable[[], None]]


@dataclass
class ShardedCheckpointer:
    """Saves/loads model chunks + optimiser + scheduler into one directory of a checkpoint.

    Every rank calls every method (they are collective). With `async_save`, `save` returns once the
    tensors are staged and the files are written by a background process; `finalize(blocking)`
    completes finished saves (writes their metadata) and then runs their `on_done` (e.g. the commit
    by rename). Call `finalize(blocking=True)` before reading a checkpoint or exiting.
    """

    options: ShardedCheckpointOptions = field(default_factory=ShardedCheckpointOptions)

    def __post_init__(self) -> None:
        self._queue = None
        self._pending: list[_Pending] = []
        self._strategy = None

    # ----- save -------------------------------------------------------------------------------
    def save(self, directory: str, chunks: list[nn.Module], optimizer: Any, scheduler: Any,
             on_done: Optional[Callable[[], None]] = None) -> None:
        """Write the sharded state into `directory` (created; must be empty or absent)."""
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        if dist.get_rank() == 0:
            os.makedirs(directory, exist_ok=True)
        dist.barrier()
        if not os.path.isdir(directory):
            raise ShardedCheckpointError(f"{directory} is not visible on rank {dist.get_rank()}: "
                                         "the run directory must be on a filesystem every node sees")
        state = _sharded_state_dict(chunks, optimizer, scheduler, with_optimizer=True, is_loading=False)
        if self._strategy is None:
            self._strategy = _save_strategy(self.options)
        request = dist_checkpointing.save(state, directory, sharded_strategy=self._strategy,
                                          async_sharded_save=self.options.async_save)
        if request is None:
            if on_done is not None:
                on_done()
            return
        if self._queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue(persistent=False)
        index = self._queue.schedule_async_request(request)
        self._pending.append(_Pending(index, on_done))

    def finalize(self, blocking: bool = True) -> list[int]:
        """Complete background saves that have finished on every rank (all of them if blocking);
        returns their indices. Collective when a save is pending; free otherwise."""
        if self._queue is None or not self._pending:
            return []
        done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        for index in done:
            pending = next(p for p in self._pending if p.call_index == index)
            self._pending.remove(pending)
            if pending.on_done is not None:
                pending.on_done()
        return done

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ----- load -------------------------------------------------------------------------------
    def load(self, directory: str, chunks: list[nn.Module], optimizer: Any = None, scheduler: Any = None,
             load_optimizer: bool = True) -> None:
        """Load `directory` (written under any layout) into this rank's chunks, optimiser, scheduler."""
        load_sharded(directory, chunks, optimizer, scheduler, load_optimizer)


def sharded_dir(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, SHARDED_SUBDIR)


def run_state_dir(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, RUN_STATE_SUBDIR)


def is_sharded_checkpoint(directory: str) -> bool:
    """True when `directory` holds a complete dist_checkpointing checkpoint (its metadata is
    written last, after every shard)."""
    return os.path.isfile(os.path.join(directory, "metadata.json"))


def load_sharded(directory: str, chunks: list[nn.Module], optimizer: Any = None, scheduler: Any = None,
                 load_optimizer: bool = True) -> None:
    """See `ShardedCheckpointer.load`. With `load_optimizer=False` only the model weights are read
    (evaluation, export)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from adapt_pretrain.megatron.optim import _unalias_adam_steps

    if not is_sharded_checkpoint(directory):
        raise ShardedCheckpointError(f"{directory} is not a complete sharded checkpoint (no metadata.json)")
    if load_optimizer and (optimizer is None or scheduler is None):
        raise ValueError("load_optimizer=True needs the optimizer and the scheduler")
    state = _sharded_state_dict(chunks, optimizer, scheduler, with_optimizer=load_optimizer, is_loading=True)
    try:
        loaded = dist_checkpointing.load(state, directory, sharded_strategy=_load_strategy(directory))
    except CheckpointingException as exc:
        raise ShardedCheckpointError(f"cannot load {directory} into this model: {exc}") from exc
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[model_key(i)], strict=True)
    if load_optimizer:
        _restore_zero_step(loaded[OPTIMIZER_KEY])
        optimizer.load_state_dict(loaded[OPTIMIZER_KEY])
        _unalias_adam_steps(optimizer)
        # megatron's scheduler *adds* the saved step count: start from 0 (exact also in-process)
        scheduler.num_steps = 0
        scheduler.load_state_dict(loaded[SCHEDULER_KEY])
    elif hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()  # bf16: refresh the fp32 main copies from the loaded weights


__all__ = ["RUN_STATE_SUBDIR", "SHARDED_SUBDIR", "ShardedCheckpointError", "ShardedCheckpointOptions",
           "ShardedCheckpointer", "is_sharded_checkpoint", "load_sharded", "model_sharded_state_dict", "run_state_dir",
           "sharded_dir"]

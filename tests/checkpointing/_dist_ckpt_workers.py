"""Worker side of the dist_ckpt tests (run as a job of the resharding tests' DP 2 process group)."""
from __future__ import annotations

import os

import torch


def async_save_then_load(chunks: list, optimizer, scheduler, directory: str) -> dict:
    """An asynchronous save (not complete before finalize), then a load over overwritten weights."""
    from adapt_pretrain.megatron.dist_ckpt import (ShardedCheckpointer, ShardedCheckpointOptions, is_sharded_checkpoint,
                                                   load_sharded)
    from adapt_pretrain.megatron.reshard import gather_full_state_dict, load_full_state_dict

    saved = gather_full_state_dict(chunks)
    done = []
    checkpointer = ShardedCheckpointer(ShardedCheckpointOptions(async_save=True))
    checkpointer.save(directory, chunks, optimizer, scheduler, on_done=lambda: done.append(True))
    complete_before = is_sharded_checkpoint(directory)
    pending = checkpointer.pending
    load_full_state_dict(chunks, {k: torch.zeros_like(v) for k, v in saved.items()})  # the staged copy is unaffected
    checkpointer.finalize(blocking=True)
    torch.distributed.barrier()
    complete_after = is_sharded_checkpoint(directory)
    load_sharded(directory, chunks, optimizer, scheduler)
    loaded = gather_full_state_dict(chunks)
    files = {name: os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)}
    return {"complete_before": complete_before, "complete_after": complete_after, "pending": pending, "done": done,
            "exact": all(torch.equal(loaded[k], saved[k]) for k in saved), "files": files,
            "param_bytes": sum(v.numel() * 4 for v in saved.values()), "directory": directory}

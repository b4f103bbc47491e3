"""dist_ckpt on 2 data-parallel ranks (real gloo processes): an asynchronous save completes only at
finalize (the commit callback runs then), loads back exactly, and the fully parallel save splits the
writing between the two ranks with each tensor written once."""
from __future__ import annotations

import pytest

from tests.checkpoint._dist_ckpt_workers import async_save_then_load
from tests.distributed_helper import run_distributed


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    return run_distributed(async_save_then_load, 2, str(tmp_path_factory.mktemp("async") / "model"), timeout=600)


def test_async_save_completes_at_finalize_and_loads_exactly(async_run):
    for rank_result in async_run:
        assert rank_result["pending"] == 1 and not rank_result["complete_before"]
        assert rank_result["complete_after"] and rank_result["done"] == [True]
        assert rank_result["exact"]


def test_fully_parallel_save_writes_each_tensor_once_split_over_ranks(async_run):
    files = async_run[0]["files"]
    shards = {name: size for name, size in files.items() if name.endswith(".distcp")}
    per_rank = {name.split("_")[2]: size for name, size in shards.items()}  # __RANK_THREAD.distcp
    assert sorted(per_rank) == ["0", "1"] and min(per_rank.values()) > 0, shards
    # every tensor (parameters, exp_avg, exp_avg_sq) is stored once: its stored chunks tile it exactly
    # (torch's own reader of the metadata, not megatron's)
    import math

    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(async_run[0]["directory"]).read_metadata()
    stored: dict[str, int] = {}
    for index in metadata.storage_data:
        chunk = metadata.state_dict_metadata[index.fqn]
        if hasattr(chunk, "chunks"):
            sizes = [c.sizes for c in chunk.chunks if tuple(c.offsets) == tuple(index.offset)]
            assert len(sizes) == 1, index
            stored[index.fqn] = stored.get(index.fqn, 0) + math.prod(sizes[0])
    tensors = {k: math.prod(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "chunks")}
    assert stored == tensors
    assert sum(tensors.values()) * 4 == 3 * async_run[0]["param_bytes"]  # parameters + two moments, fp32
    # file bytes: those tensors once plus per-tensor headers (1.4x at this tiny size); one copy per
    # data-parallel replica would be 2x or more
    assert sum(shards.values()) < 1.6 * 3 * async_run[0]["param_bytes"]

"""Layout.plan: the data-parallel size comes from the world size; indivisible layouts name the fields."""
from __future__ import annotations

import dataclasses

import pytest

from adapt_pretrain.config import ConfigError
from adapt_pretrain.layout import Layout
from adapt_pretrain.megatron.config import ParallelConfig
from adapt_pretrain.training.config import TrainConfig


def test_plan_derives_dp_and_micro_batches():
    layout = Layout.plan(ParallelConfig(tensor=2, pipeline=2, virtual_pipeline=2),
                         TrainConfig(micro_batch_size=2, global_batch_size=24), 12)
    assert (layout.dp, layout.num_microbatches, layout.vp) == (3, 4, 2)  # 24 = 2 * 3 * 4
    assert layout.as_dict() == {"world_size": 12, "tp": 2, "pp": 2, "vp": 2, "dp": 3, "micro_batch_size": 2,
                                "num_microbatches": 4}
    assert Layout.plan(ParallelConfig(), TrainConfig(gradient_accumulation_steps=5), 4).num_microbatches == 5
    assert Layout.plan(ParallelConfig(), TrainConfig(), 1).as_dict()["num_microbatches"] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.dp = 4


@pytest.mark.parametrize("parallel, train, world, message", [
    (dict(tensor=2, pipeline=2), {}, 6, r"world size 6 is not divisible by parallel\.tensor \* parallel\.pipeline = 2 \* 2"),
    (dict(tensor=4), {}, 2, r"world size 2 is not divisible"),
    ({}, dict(micro_batch_size=2, global_batch_size=6), 2,
     r"train\.global_batch_size=6 must be a multiple of train\.micro_batch_size \* data-parallel size = 2 \* 2 = 4"),
    ({}, dict(micro_batch_size=2, global_batch_size=8, gradient_accumulation_steps=3), 2,
     r"train\.gradient_accumulation_steps=3 contradicts train\.global_batch_size=8"),
])
def test_plan_refuses_layouts_that_do_not_divide(parallel, train, world, message):
    with pytest.raises(ConfigError, match=message):
        Layout.plan(ParallelConfig(**parallel), TrainConfig(**train), world)

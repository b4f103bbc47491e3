"""Validation of the step engine's dataclass configs: bad values fail at construction, naming the field."""
from __future__ import annotations

import pytest

from adapt_pretrain.config import ConfigError
from adapt_pretrain.layout import Layout
from adapt_pretrain.megatron import ModelConfig, OptimConfig, ParallelConfig
from adapt_pretrain.training.config import TrainConfig


def _model(**kw):
    base = dict(vocab_size=1000, seq_len=64, hidden_size=64, num_layers=4, num_attention_heads=4)
    return ModelConfig(**{**base, **kw})


def test_model_defaults_and_padding():
    m = _model()
    assert m.ffn_hidden_size == 256
    assert m.padded_vocab_size == 1024  # rounded up to 128, independent of TP


@pytest.mark.parametrize("kw, field", [
    (dict(hidden_size=66), "num_attention_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(activation="relu6"), "activation"),
    (dict(hidden_dropout=1.5), "hidden_dropout"),
    (dict(num_query_groups=3), "num_query_groups"),
])
def test_model_rejects(kw, field):
    with pytest.raises(ConfigError, match=field):
        _model(**kw)


def test_layout_checks():
    _model().check_layout(ParallelConfig(tensor=2, pipeline=2))
    with pytest.raises(ConfigError, match="num_layers"):
        _model(num_layers=3).check_layout(ParallelConfig(pipeline=2))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        _model(num_attention_heads=2, hidden_size=64).check_layout(ParallelConfig(tensor=4))
    with pytest.raises(ConfigError, match="world size 6"):
        Layout.plan(ParallelConfig(tensor=4), TrainConfig(), 6)
    assert Layout.plan(ParallelConfig(tensor=2), TrainConfig(), 8).dp == 4


def test_parallel_and_optim_rejects():
    with pytest.raises(ConfigError, match="virtual_pipeline"):
        ParallelConfig(virtual_pipeline=2)
    assert ParallelConfig(pipeline=2, virtual_pipeline=1).virtual_pipeline is None
    with pytest.raises(ConfigError, match="min_lr"):
        OptimConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ConfigError, match="lr_decay_style"):
        OptimConfig(lr_decay_style="step")
    with pytest.raises(ConfigError, match="warmup_steps"):
        OptimConfig(warmup_steps=20, total_steps=10)
    with pytest.raises(ConfigError, match="warmup_steps"):
        OptimConfig(warmup_steps=10, total_steps=10)

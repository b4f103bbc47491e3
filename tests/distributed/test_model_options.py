"""The model-building options (no processes): attention choice, fusions, recomputation, overlap."""
from __future__ import annotations

import pytest
import torch

from adapt_pretrain.config import ConfigError
from adapt_pretrain.megatron import ModelConfig, ParallelConfig
from adapt_pretrain.megatron import model as model_module


def _model(**kw):
    base = dict(vocab_size=1000, seq_len=64, hidden_size=64, num_layers=2, num_attention_heads=4)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kw, field", [(dict(attention="flash"), "attention"), (dict(recompute="some"), "recompute"),
                                       (dict(fusions="yes"), "fusions")])
def test_rejects_bad_values(kw, field):
    with pytest.raises(ConfigError, match=f"model.{field}"):
        _model(**kw)
    with pytest.raises(ConfigError, match="overlap_grad_reduce"):
        ParallelConfig(overlap_grad_reduce="no")


def test_attention_resolution(monkeypatch):
    assert _model().attention == "auto"
    monkeypatch.setattr(model_module, "transformer_engine_available", lambda: False)
    assert model_module.resolve_attention("auto") == "sdpa"
    assert model_module.resolve_attention("local") == "local"
    with pytest.raises(ConfigError, match="transformer_engine"):
        model_module.resolve_attention("te")
    monkeypatch.setattr(model_module, "transformer_engine_available", lambda: True)
    assert model_module.resolve_attention("auto") == "te"


def test_transformer_engine_needs_a_gpu():
    if not torch.cuda.is_available():
        assert not model_module.transformer_engine_available()


def test_fusions_apply_on_gpu_only_and_where_megatron_supports_them():
    swiglu = _model(activation="swiglu", add_bias_linear=False, position_embedding="rope")
    gelu_no_bias = _model(add_bias_linear=False)
    off = model_module._fusion_flags(swiglu, "sdpa", gpu=False)
    assert not any(off.values())
    on = model_module._fusion_flags(swiglu, "sdpa", gpu=True)
    assert on["bias_activation_fusion"] and on["bias_dropout_fusion"]
    assert not on["apply_rope_fusion"] and not on["masked_softmax_fusion"]  # rope fusion needs TE
    assert model_module._fusion_flags(swiglu, "te", gpu=True)["apply_rope_fusion"]
    assert not model_module._fusion_flags(gelu_no_bias, "sdpa", gpu=True)["bias_activation_fusion"]
    assert not any(model_module._fusion_flags(_model(fusions=False), "sdpa", gpu=True).values())


@pytest.mark.parametrize("recompute, granularity", [("none", None), ("selective", "selective"), ("full", "full")])
def test_recompute_reaches_megatron(recompute, granularity):
    config = model_module.transformer_config(_model(recompute=recompute), ParallelConfig())
    assert config.recompute_granularity == granularity
    if recompute == "full":
        assert config.recompute_method == "uniform" and config.recompute_num_layers == 1
    if recompute == "selective":
        assert config.recompute_modules == ["core_attn"]

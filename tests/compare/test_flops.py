"""FLOPs accounting against a hand count for a tiny config."""
from adapt_pretrain.experiments.methods.costs import adapt_flops, bm25_flops, embedding_selection_flops
import pytest

from adapt_pretrain.flops import (ModelShape, forward_flops_per_token, matmul_params, peak_bf16_flops,
                                  throughput_metrics, training_flops)

TINY = ModelShape(vocab_size=10, seq_len=4, hidden_size=2, num_layers=1, num_attention_heads=1, ffn_hidden_size=8)


def test_tiny_model_hand_count():
    # attention projections 4*2*2=16, MLP 2*2*8=32, output layer 2*10=20 -> 68 matmul parameters
    assert matmul_params(TINY) == 68
    # forward per token: 2*68 = 136, plus attention scores 1 layer * 2 * (2*4*2) = 32 -> 168
    assert forward_flops_per_token(TINY) == 168
    assert training_flops(TINY, tokens=100) == 3 * 168 * 100


def test_grouped_query_attention_and_swiglu_shrink_and_grow():
    gqa = ModelShape(10, 4, 4, 1, 4, 8, num_query_groups=2)
    # Q + out: 2*16 = 32, K + V at half size: 16, MLP 2*4*8 = 64, output 40 -> 152
    assert matmul_params(gqa) == 152
    swiglu = ModelShape(10, 4, 2, 1, 1, 8, swiglu=True)
    assert matmul_params(swiglu) == 16 + 48 + 20


def test_adapt_overhead_hand_count():
    # 10 steps, refresh every 4 -> refreshes at steps 0, 4, 8 = 3; 6 anchor tokens each
    report = adapt_flops(TINY, tokens=1000, groups=50, steps=10, refresh_interval=4, anchor_tokens=6)
    assert report.training == 3 * 168 * 1000
    assert report.online_scoring == 2 * 2 * 1000 + 2 * 2 * 50
    assert report.anchor_refresh == 3 * 168 * 6
    assert report.paper_convention == 8 * 68 * 1000
    d = report.as_dict()
    assert d["total"] == report.training + report.online_scoring + report.anchor_refresh
    assert d["overhead_ratio"] > 1.0


def test_prepare_time_scoring():
    assert embedding_selection_flops(TINY, 500) == 168 * 500
    assert bm25_flops(500, 50) == 2 * 500 * 50


def test_throughput_hand_count():
    # TINY trains at 3 * 168 = 504 FLOPs per token; 1000 tokens in 2 s on 4 devices:
    # 500 tokens/s, 504 * 1000 / 2 / 4 = 63,000 FLOP/s per device = 6.3e-8 TFLOP/s
    m = throughput_metrics(1000, 2.0, TINY, 4, device_name="NVIDIA H100 80GB HBM3")
    assert m["train/tokens_per_s"] == pytest.approx(500.0, rel=1e-12)
    assert m["train/tflops_per_device"] == pytest.approx(6.3e-8, rel=1e-12)
    assert m["train/mfu"] == pytest.approx(63_000 / 989e12, rel=1e-12)
    # an A100 has a third of the peak: MFU x 989/312
    a100 = throughput_metrics(1000, 2.0, TINY, 4, device_name="NVIDIA A100-SXM4-80GB")
    assert a100["train/mfu"] == pytest.approx(63_000 / 312e12, rel=1e-12)


def test_mfu_only_for_known_devices():
    assert set(throughput_metrics(1000, 2.0, TINY, 1)) == {"train/tokens_per_s", "train/tflops_per_device"}
    assert "train/mfu" not in throughput_metrics(1000, 2.0, TINY, 1, device_name="Some Future GPU")
    assert peak_bf16_flops(None) is None and peak_bf16_flops("cpu") is None
    assert peak_bf16_flops("NVIDIA H200") == 989e12 and peak_bf16_flops("NVIDIA GH200 480GB") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM figure
    with pytest.raises(ValueError, match="num_devices"):
        throughput_metrics(1000, 2.0, TINY, 0)
    with pytest.raises(ValueError, match="seconds"):
        throughput_metrics(1000, 0.0, TINY, 1)

"""FLOPs accounting against a hand count for a tiny config."""
from adapt_pretrain.experiments.methods.costs import adapt_flops, bm25_flops, embedding_selection_flops
from adapt_pretrain.flops import ModelShape, forward_flops_per_token, matmul_params, training_flops

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

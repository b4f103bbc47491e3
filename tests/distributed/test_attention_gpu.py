"""GPU only (skipped without CUDA; run by benchmarks/gpu_check.sh): `SDPAttention` in bf16 runs on a
fused SDPA kernel (flash / cuDNN / memory-efficient; the math fallback is excluded, so a layout it
cannot take fails here instead of silently materialising the scores) and matches megatron's local
attention and an fp32 reference, forward and backward, with and without grouped-query attention."""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SEQ, BATCH, HEAD_DIM = 512, 2, 64


@pytest.fixture(scope="module")
def tp1():
    import torch.distributed as dist

    from adapt_pretrain.megatron import ParallelConfig, setup_parallel, teardown_parallel
    from tests.distributed_helper import free_port

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    setup_parallel(ParallelConfig(), seed=1)
    yield
    teardown_parallel()


def _rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("heads, groups", [(8, 8), (8, 2)], ids=["MHA", "GQA"])
def test_sdpa_fused_kernel_matches_local_attention_bf16(tp1, heads, groups):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from adapt_pretrain.megatron import ModelConfig, ParallelConfig
    from adapt_pretrain.megatron.attention import SDPAttention
    from adapt_pretrain.megatron.model import transformer_config
    from tests.distributed._attention_worker import reference_attention

    config = transformer_config(ModelConfig(vocab_size=128, seq_len=SEQ, hidden_size=heads * HEAD_DIM, num_layers=1,
                                            num_attention_heads=heads, num_query_groups=groups), ParallelConfig())
    assert config.bf16
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(SEQ, BATCH, heads, HEAD_DIM, device="cuda", generator=g)
    k, v = (torch.randn(SEQ, BATCH, groups, HEAD_DIM, device="cuda", generator=g) for _ in range(2))
    up = torch.randn(SEQ, BATCH, heads * HEAD_DIM, device="cuda", generator=g)
    results = {}
    for name, module in (("sdpa", SDPAttention(**kwargs)), ("local", DotProductAttention(**kwargs))):
        inputs = [t.bfloat16().requires_grad_(True) for t in (q, k, v)]
        fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        with sdpa_kernel(fused) if name == "sdpa" else contextlib.nullcontext():
            out = module(*inputs, None)
            out.backward(up.bfloat16())
        results[name] = [out.detach()] + [t.grad for t in inputs]
    ref_in = [t.cpu().double().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*ref_in, 1.0 / math.sqrt(HEAD_DIM))
    ref.backward(up.cpu().double())
    truth = [ref.detach()] + [t.grad for t in ref_in]
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        err_sdpa = _rel_l2(results["sdpa"][i].cpu(), truth[i])
        err_local = _rel_l2(results["local"][i].cpu(), truth[i])
        assert err_sdpa < 2e-2, f"{name}: SDPA relative L2 error {err_sdpa:.2e} vs fp64"
        assert err_sdpa <= 2 * err_local + 1e-3, f"{name}: SDPA {err_sdpa:.2e} vs megatron local {err_local:.2e}"

"""Worker side of test_attention.py (module-level so spawned gloo processes can import it).

One process group per TP size runs every check in turn (megatron imports once per process):
  * core attention: `SDPAttention` vs megatron's `DotProductAttention` vs an fp64 plain-torch
    reference on this rank's heads (forward, and backward under a non-uniform upstream gradient);
  * whole model: GPTModel with attention=sdpa vs attention=local from the same initial weights;
  * recomputation: one ADAPT step with recompute none / selective / full (the hidden-state capture
    feeds the weights, so a capture broken by recomputation changes loss and gradients);
  * anchor refresh: runs the trunk only (the output layer never runs) and gives the centroid of
    an independent fp64 computation.
"""
from __future__ import annotations

import math
from typing import Any

import torch

SEED = 4321
SEQ, BATCH, HEAD_DIM = 24, 2, 8
VOCAB, HIDDEN, LAYERS = 96, 32, 2


# ----------------------------------------------------------------------------- core attention
def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention in fp64 with explicit loops over heads: q [s, b, n, d], k/v [s, b, g, d]
    (query head i reads K/V group i // (n / g)); returns [s, b, n * d]."""
    s, b, n, d = q.shape
    per_group = n // k.shape[2]
    allowed = torch.ones(s, s, dtype=torch.bool).tril()
    heads = []
    for i in range(n):
        qi, ki, vi = q[:, :, i].double(), k[:, :, i // per_group].double(), v[:, :, i // per_group].double()
        scores = torch.einsum("qbd,kbd->bqk", qi, ki) * scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        heads.append(torch.einsum("bqk,kbd->qbd", probs, vi))
    return torch.stack(heads, dim=2).reshape(s, b, n * d)


def _attention_inputs(heads: int, groups: int, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """Full-head q/k/v/upstream (same on every rank) and this rank's contiguous head shard."""
    g = torch.Generator().manual_seed(SEED + heads * 10 + groups)
    full = dict(q=torch.randn(SEQ, BATCH, heads, HEAD_DIM, generator=g),
                k=torch.randn(SEQ, BATCH, groups, HEAD_DIM, generator=g),
                v=torch.randn(SEQ, BATCH, groups, HEAD_DIM, generator=g),
                up=torch.randn(SEQ, BATCH, heads, HEAD_DIM, generator=g))  # non-uniform upstream grad
    hl, gl = heads // tp_size, groups // tp_size
    local = dict(q=full["q"][:, :, tp_rank * hl:(tp_rank + 1) * hl], k=full["k"][:, :, tp_rank * gl:(tp_rank + 1) * gl],
                 v=full["v"][:, :, tp_rank * gl:(tp_rank + 1) * gl], up=full["up"][:, :, tp_rank * hl:(tp_rank + 1) * hl])
    return {"full": full, "local": {k: v.contiguous() for k, v in local.items()}}


def _run_core(module: torch.nn.Module, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    q, k, v = (local[n].clone().requires_grad_(True) for n in ("q", "k", "v"))
    out = module(q, k, v, None)
    out.backward(local["up"].reshape(out.shape))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def core_attention_check(tp_rank: int, tp_size: int, heads: int, groups: int) -> dict[str, Any]:
    """SDPA, megatron's local attention and the fp64 reference on this rank's heads."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from adapt_pretrain.megatron import ModelConfig, ParallelConfig
    from adapt_pretrain.megatron.attention import SDPAttention
    from adapt_pretrain.megatron.model import transformer_config

    model = ModelConfig(vocab_size=VOCAB, seq_len=SEQ, hidden_size=heads * HEAD_DIM, num_layers=1,
                        num_attention_heads=heads, num_query_groups=groups)
    config = transformer_config(model, ParallelConfig(tensor=tp_size))
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    data = _attention_inputs(heads, groups, tp_rank, tp_size)
    local = data["local"]
    sdpa = _run_core(SDPAttention(**kwargs), local)
    megatron = _run_core(DotProductAttention(**kwargs), local)
    # fp64 ground truth on the full heads, sliced to this rank's output columns and input heads
    full = {n: data["full"][n].double().clone().requires_grad_(n != "up") for n in data["full"]}
    ref_out = reference_attention(full["q"], full["k"], full["v"], 1.0 / math.sqrt(HEAD_DIM))
    ref_out.backward(full["up"].reshape(ref_out.shape))
    hl, gl = heads // tp_size, groups // tp_size
    cols = slice(tp_rank * hl * HEAD_DIM, (tp_rank + 1) * hl * HEAD_DIM)
    reference = {"out": ref_out.detach()[:, :, cols],
                 "dq": full["q"].grad[:, :, tp_rank * hl:(tp_rank + 1) * hl],
                 "dk": full["k"].grad[:, :, tp_rank * gl:(tp_rank + 1) * gl],
                 "dv": full["v"].grad[:, :, tp_rank * gl:(tp_rank + 1) * gl]}
    return {"sdpa": sdpa, "megatron": megatron, "reference": reference}


# ----------------------------------------------------------------------------- whole model
def model_cfg(attention: str, recompute: str = "none"):
    from adapt_pretrain.megatron import ModelConfig

    return ModelConfig(vocab_size=VOCAB, seq_len=SEQ, hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=4,
                       num_query_groups=2, position_embedding="rope", normalization="RMSNorm", activation="swiglu",
                       add_bias_linear=False, attention=attention, recompute=recompute)


def micro_batch(seed: int) -> dict[str, Any]:
    """Packed documents of 3-9 tokens (the trainer's micro-batch format), padding at the end."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    gid = torch.full((BATCH, SEQ), -1, dtype=torch.long)
    pos = torch.zeros((BATCH, SEQ), dtype=torch.long)
    mask = torch.zeros((BATCH, SEQ))
    groups = 0
    for row in range(BATCH):
        t, end = 0, SEQ - 3 * row
        while t < end:
            n = min(int(torch.randint(3, 10, (1,), generator=g)), end - t)
            gid[row, t:t + n], pos[row, t:t + n] = groups, torch.arange(1, n + 1)
            mask[row, t:t + n - 1] = 1.0
            groups, t = groups + 1, t + n
    return dict(tokens=tokens, labels=labels, loss_mask=mask, group_id=gid, position=pos, num_groups=groups)


def _build(attention: str, tp_size: int, recompute: str = "none"):
    from adapt_pretrain.megatron import ParallelConfig, build_model, setup_parallel

    parallel = ParallelConfig(tensor=tp_size)
    setup_parallel(parallel, SEED)  # seeds torch: every build starts from the same weights
    model = model_cfg(attention, recompute)
    return model, parallel, build_model(model, parallel)


def _grads(chunks) -> dict[str, torch.Tensor]:
    from adapt_pretrain.megatron.model import unwrap

    return {n: p.main_grad.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()}


def model_forward_backward(attention: str, tp_size: int) -> dict[str, Any]:
    """Per-token CE of a plain GPTModel forward and the gradients of its masked mean."""
    from adapt_pretrain.megatron import teardown_parallel

    _, _, chunks = _build(attention, tp_size)
    batch = micro_batch(7)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    losses = chunks[0](batch["tokens"], position_ids, None, labels=batch["labels"])
    (losses * batch["loss_mask"]).sum().div(batch["loss_mask"].sum()).backward()
    out = {"losses": losses.detach(), "grads": _grads(chunks)}
    teardown_parallel()
    return out


def adapt_step(recompute: str, tp_size: int) -> dict[str, Any]:
    """Anchor refresh, then one ADAPT step; counts output-layer calls during the refresh."""
    from adapt_pretrain.config import AdaptConfig
    from adapt_pretrain.core import AdaptEngine
    from adapt_pretrain.megatron import OptimConfig, TrainStep, build_optimizer, teardown_parallel
    from adapt_pretrain.megatron.model import unwrap

    model, parallel, chunks = _build("sdpa", tp_size, recompute)
    optimizer, scheduler = build_optimizer(chunks, OptimConfig(lr=1e-3, min_lr=1e-4, total_steps=10))
    engine = AdaptEngine(AdaptConfig(enabled=True, tau=0.05, refresh_interval=5))
    step_fn = TrainStep(chunks, optimizer, scheduler, engine, model, parallel, num_microbatches=2)
    calls = []
    handle = unwrap(chunks[0]).output_layer.register_forward_hook(lambda *a: calls.append("refresh"))
    step_fn.refresh_anchors(0, anchor_batches())
    handle.remove()
    independent = _independent_centroid(chunks)  # initial weights, as the refresh saw them
    result = step_fn(0, [micro_batch(11), micro_batch(12)])
    out = {"refresh_output_layer_calls": len(calls), "centroid": engine.anchors.centroid.clone(),
           "independent_centroid": independent, "loss": result.loss, "weights": result.local_groups["weights"],
           "grads": _grads(chunks)}
    teardown_parallel()
    return out


def anchor_batches() -> list[dict[str, Any]]:
    return [micro_batch(21), micro_batch(22)]


def _independent_centroid(chunks) -> torch.Tensor:
    """The anchor centroid from a full model forward in eval mode (hidden = the output layer's
    input), pooled and normalised in fp64 with plain loops: shares no code with the refresh path
    (run on the initial weights: call before any optimiser step)."""
    from adapt_pretrain.megatron.model import unwrap

    gpt = unwrap(chunks[0])
    captured = []
    handle = gpt.output_layer.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    units = []
    gpt.eval()
    with torch.no_grad():
        for batch in anchor_batches():
            captured.clear()
            gpt(batch["tokens"], torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ), None)
            hidden = captured[0].double()  # [s, b, H]
            for group in range(batch["num_groups"]):
                where = (batch["group_id"] == group).nonzero().tolist()
                pooled = sum(batch["position"][r, t].item() * hidden[t, r] for r, t in where)
                units.append(pooled / pooled.norm())
    gpt.train()
    handle.remove()
    return torch.stack(units).mean(dim=0)


def run_all(rank: int, world_size: int) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    from adapt_pretrain.megatron import ParallelConfig, setup_parallel, teardown_parallel

    out: dict[str, Any] = {"core": {}}
    setup_parallel(ParallelConfig(tensor=world_size), SEED)
    tp_rank = ps.get_tensor_model_parallel_rank()
    for heads, groups in ((4, 4), (4, 2)):
        out["core"][(heads, groups)] = core_attention_check(tp_rank, world_size, heads, groups)
    teardown_parallel()
    out["model"] = {att: model_forward_backward(att, world_size) for att in ("local", "sdpa")}
    # the centroid check runs on the step engine's first refresh (initial weights)
    out["adapt"] = {rc: adapt_step(rc, world_size) for rc in ("none", "selective", "full")}
    return out

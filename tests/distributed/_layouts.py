"""Worker side of the layout-equivalence tests (module-level so spawned processes can import it).

One spawned process group runs several layouts one after another (setup -> checks -> teardown of
megatron's groups; the gloo world group stays), which saves the ~5 s megatron import per process.
"""
from __future__ import annotations

import io
import math
import time
from typing import Any, Optional

import torch

VOCAB, SEQ, HIDDEN, LAYERS, HEADS = 128, 32, 32, 4, 4
MICRO_BATCH = 2
GLOBAL_MICROBATCHES = 4
STEPS = 3
REFRESH_INTERVAL = 2
SEED = 1234
DOMAINS = ("d0", "d1", "d2")  # micro_batch's group_domain cycles through 0, 1, 2


def model_cfg(activation: str = "gelu"):
    from adapt_pretrain.megatron import ModelConfig

    return ModelConfig(vocab_size=VOCAB, seq_len=SEQ, hidden_size=HIDDEN, num_layers=LAYERS,
                       num_attention_heads=HEADS, activation=activation)


def optim_cfg():
    from adapt_pretrain.megatron import OptimConfig

    # eps=1e-6 (not 1e-8): Adam moves an entry by ~lr * g / (|g| + eps). The key bias has a zero true
    # gradient (softmax is invariant to shifting every key by the same vector), so its gradient is
    # rounding noise (~1e-12) that differs between layouts; with eps=1e-8 that noise becomes a
    # ~1e-4 lr update difference, with eps=1e-6 it stays ~1e-6 lr. Every real gradient entry here
    # (>= 1e-5) is still in Adam's normalised regime.
    return OptimConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1, eps=1e-6, warmup_steps=0, total_steps=10)


def adapt_cfg(enabled: bool = True, standardize: bool = True, **overrides: Any):
    from adapt_pretrain.config import AdaptConfig

    # small tau: weights far from uniform (asserted in the test). standardize: the running
    # statistics' DP reduction is exercised from step 1 on (step 0 is uniform: no statistics yet).
    # momentum 0.8, not the default 0.5 where swapping m and 1 - m changes nothing.
    return AdaptConfig(enabled=enabled, tau=0.5 if standardize else 0.05, standardize=standardize,
                       standardize_momentum=0.8, refresh_interval=REFRESH_INTERVAL, **overrides)


def linupper_cfg():
    from adapt_pretrain.config import AdaptConfig

    # r = 0.25: weights spread over [exp(-4), 1] (asserted in the test)
    return AdaptConfig(enabled=True, policy="linupper", linupper_d=1.0, linupper_r=0.25)


# The runs every layout makes from the same initial weights: name -> (config, steps). `one` and
# `tokens`: one weighted step (raw-score weights); `linupper`: a uniform step then a weighted one;
# `adapt`: STEPS standardised steps with refreshes, then the resume check.
def runs() -> dict[str, tuple[Any, int]]:
    return {"one": (adapt_cfg(standardize=False), 1),
            "tokens": (adapt_cfg(standardize=False, normalize="tokens"), 1),
            "linupper": (linupper_cfg(), 2),
            "adapt": (adapt_cfg(), STEPS)}


def micro_batch(seed: int, b: int = MICRO_BATCH, s: int = SEQ) -> dict[str, Any]:
    """A packed micro-batch in the data stream's format: random document lengths, padding at the end
    of the last row, loss_mask 0 on each document's last token and on padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    gid = torch.full((b, s), -1, dtype=torch.long)
    pos = torch.zeros((b, s), dtype=torch.long)
    mask = torch.zeros((b, s), dtype=torch.float32)
    num_groups = 0
    for row in range(b):
        end = s - (5 if row == b - 1 else 0)
        t = 0
        while t < end:
            length = min(int(torch.randint(3, 14, (1,), generator=g)), end - t)
            gid[row, t:t + length] = num_groups
            pos[row, t:t + length] = torch.arange(1, length + 1)
            mask[row, t:t + length - 1] = 1.0
            num_groups += 1
            t += length
    return dict(tokens=tokens, labels=labels, loss_mask=mask, group_id=gid, position=pos,
                group_domain=torch.arange(num_groups) % 3, group_doc_id=torch.arange(num_groups) + 1000 * seed,
                group_bm25=torch.zeros(num_groups), num_groups=num_groups)


def global_batches(step: int) -> list[dict[str, Any]]:
    return [micro_batch(100 * step + i) for i in range(GLOBAL_MICROBATCHES)]


def anchor_batches() -> list[dict[str, Any]]:
    return [micro_batch(9000 + i) for i in range(2)]


def _shard(items: list, dp_rank: int, dp_size: int, contiguous: bool = True) -> list:
    if contiguous:
        n = len(items) // dp_size
        return items[dp_rank * n:(dp_rank + 1) * n]
    return items[dp_rank::dp_size]


def _build(layout: dict, init: Optional[dict], activation: str = "gelu"):
    from adapt_pretrain.megatron import ParallelConfig, build_model, setup_parallel
    from adapt_pretrain.megatron.reshard import load_full_state_dict

    parallel = ParallelConfig(tensor=layout.get("tp", 1), pipeline=layout.get("pp", 1),
                              virtual_pipeline=layout.get("vp"), sequence_parallel=layout.get("sp", False))
    info = setup_parallel(parallel, SEED)
    model = model_cfg(activation)
    chunks = build_model(model, parallel)
    if init is not None:
        load_full_state_dict(chunks, init)
    return info, parallel, model, chunks


def _adapt_run(info, parallel, model, chunks, cfg, steps: int, check_resume: bool = False,
               trajectory: bool = True) -> dict[str, Any]:
    """`steps` steps of the engine configured by `cfg` (anchor refreshes when it needs them); returns
    losses, norms, centroid, refresh steps and, with `trajectory`, the full parameters and gradients
    after every step (the independent reference replays the run on them)."""
    import torch.distributed as dist

    from adapt_pretrain.core import AdaptEngine
    from adapt_pretrain.megatron import TrainStep, build_optimizer
    from adapt_pretrain.megatron.reshard import gather_full_state_dict

    optimizer, scheduler = build_optimizer(chunks, optim_cfg())
    m = GLOBAL_MICROBATCHES // info.dp_size
    engine = AdaptEngine(cfg)
    # gather_groups: every group row of the global batch, to compare each weight with the references
    step_fn = TrainStep(chunks, optimizer, scheduler, engine, model, parallel, m, gather_groups=True,
                        domains=DOMAINS)
    out: dict[str, Any] = {"loss": [], "grad_norm": [], "lr": [], "refresh_steps": [], "weights": [],
                           "groups": [], "metrics": [], "step_params": [], "step_grads": []}
    for step in range(steps):
        if engine.needs_anchor_refresh(step):
            step_fn.refresh_anchors(step, _shard(anchor_batches(), info.dp_rank, info.dp_size, contiguous=False))
            out["refresh_steps"].append(step)
        result = step_fn(step, _shard(global_batches(step), info.dp_rank, info.dp_size))
        out["loss"].append(result.loss)
        out["grad_norm"].append(result.grad_norm)
        out["lr"].append(result.lr)
        if result.groups is not None:
            out["weights"].append(result.groups["weights"])
            out["groups"].append(result.groups)
        if result.metrics is not None:  # the reduced step metrics (last stage)
            out["metrics"].append({"scalars": result.metrics.scalars, "histograms": result.metrics.histograms})
        if trajectory:
            out["step_grads"].append(gather_full_state_dict(chunks, attr="main_grad"))
            out["step_params"].append(gather_full_state_dict(chunks))
    if check_resume:
        # state_dict round trip on every rank: redoing the next step after reloading is exact
        import copy

        saved = copy.deepcopy(step_fn.state_dict())
        batch = _shard(global_batches(steps), info.dp_rank, info.dp_size)
        first = step_fn(steps, batch)
        out["resume_loss"], out["resume_grad_norm"] = first.loss, first.grad_norm
        params_first = gather_full_state_dict(chunks)
        step_fn.load_state_dict(saved)
        again = step_fn(steps, batch)
        params_again = gather_full_state_dict(chunks)
        out["resume_exact"] = first.loss == again.loss and all(
            torch.equal(params_first[k], params_again[k]) for k in params_first)
    # per-group weights live on the last stage: fetch the logging rank's (last stage, TP 0, DP 0)
    for key in ("weights", "groups"):
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, out[key] if info.is_logging_rank else None)
        out[key] = next(r for r in rows if r is not None)
    # the step metrics: every last-stage rank (every DP and TP rank) must hold the logging rank's
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (info.is_logging_rank, out["metrics"]) if out["metrics"] else None)
    held = [m for m in every if m is not None]
    out["metrics"] = next(m for logging, m in held if logging)
    out["metrics_ranks"] = len(held)
    out["metrics_identical_all"] = all(m == out["metrics"] for _, m in held)
    centroid = engine.anchors.centroid
    if centroid is not None:
        # identical on every rank: compare against rank 0's bit for bit
        ref = centroid.clone()
        dist.broadcast(ref, src=0)
        out["centroid_identical"] = bool(torch.equal(ref, centroid))
        same = torch.tensor([int(out["centroid_identical"])])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        out["centroid_identical_all"] = bool(same.item())
        out["centroid"] = centroid.clone()
    return out


def _skip_check(info, parallel, model, chunks, init: dict) -> dict[str, Any]:
    """Poison one weight with NaN: the step must report skipped, leave the other weights and the
    LR schedule untouched, and the next clean step must update normally."""
    from adapt_pretrain.core import AdaptEngine
    from adapt_pretrain.megatron import TrainStep, build_optimizer
    from adapt_pretrain.megatron.reshard import gather_full_state_dict, load_full_state_dict

    poisoned = dict(init)
    key = "decoder.final_layernorm.weight"
    poisoned[key] = init[key].clone()
    poisoned[key][0] = float("nan")
    load_full_state_dict(chunks, poisoned)
    optimizer, scheduler = build_optimizer(chunks, optim_cfg())
    step_fn = TrainStep(chunks, optimizer, scheduler, AdaptEngine(adapt_cfg(enabled=False)), model, parallel,
                        GLOBAL_MICROBATCHES // info.dp_size)
    result = step_fn(0, _shard(global_batches(0), info.dp_rank, info.dp_size))
    after = gather_full_state_dict(chunks)
    unchanged = all(torch.equal(after[k], poisoned[k]) for k in init if k != key)
    load_full_state_dict(chunks, init)
    clean = step_fn(1, _shard(global_batches(1), info.dp_rank, info.dp_size))
    return {"skipped": result.skipped, "loss_finite": math.isfinite(result.loss), "unchanged": unchanged,
            "scheduler_steps": scheduler.num_steps, "clean_skipped": clean.skipped,
            "clean_loss_finite": math.isfinite(clean.loss)}


def _gather(chunks) -> dict[str, dict]:
    from adapt_pretrain.megatron.reshard import gather_full_state_dict

    return {"params": gather_full_state_dict(chunks), "grads": gather_full_state_dict(chunks, attr="main_grad")}


def _plain_megatron_step(info, chunks, step: int, optim=None) -> float:
    """Plain training exactly the way megatron's pretrain_gpt does it: GPTModel computes the per-token
    CE (labels passed in), loss_func returns (sum(mask*CE), int token count), and megatron's own
    finalize_model_grads divides by the global count. No code of ours in the loss path."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from adapt_pretrain.megatron import build_optimizer
    from adapt_pretrain.megatron.model import unwrap

    optimizer, scheduler = build_optimizer(chunks, optim or optim_cfg())
    config = get_model_config(chunks[0])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = None
    m = GLOBAL_MICROBATCHES // info.dp_size
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
               for mb in _shard(global_batches(step), info.dp_rank, info.dp_size)]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        b, s = batch["tokens"].shape
        # GPTModel computes the per-token loss itself when given labels (pretrain_gpt.py style)
        output = model(batch["tokens"], torch.arange(s, device=device).unsqueeze(0).expand(b, s), None,
                       labels=batch["labels"])
        if not unwrap(model).post_process:
            return output, None

        def loss_func(losses):
            mask = batch["loss_mask"].view(-1).float()
            loss_sum = torch.sum(losses.view(-1).float() * mask)
            count = mask.sum().clone().detach().to(torch.int)
            return loss_sum, count, {"lm": torch.stack([loss_sum.detach(), mask.sum()])}

        return output, loss_func

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    iters = iter(batches) if len(chunks) == 1 else [iter(batches) for _ in chunks]
    store = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iters, model=chunks,
                                        num_microbatches=m, seq_length=batches[0]["tokens"].shape[1],
                                        micro_batch_size=batches[0]["tokens"].shape[0],
                                        forward_only=False)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for item in store:
        totals += item["lm"].double()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(totals, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    optimizer.step()
    scheduler.step(increment=1)
    return float(totals[0] / totals[1])


def encode(obj: Any) -> bytes:
    """Results cross the process boundary as bytes: tensors put on a torch.multiprocessing queue
    are shared through the sender's file descriptors, which vanish when the worker exits."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def decode(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def run_layouts(rank: int, world_size: int, layouts: list[dict], init: Optional[bytes],
                with_plain: bool = True) -> Optional[bytes]:
    """For each layout: the `runs()` (each from `init`) and, if asked, ADAPT-off vs plain megatron
    (one step each from `init`). Returns encoded results on rank 0, None elsewhere."""
    from adapt_pretrain.megatron import teardown_parallel
    from adapt_pretrain.megatron.reshard import gather_full_state_dict

    init = decode(init) if init is not None else None
    results = []
    for layout in layouts:
        t0 = time.perf_counter()
        info, parallel, model, chunks = _build(layout, init, layout.get("activation", "gelu"))
        timing = {"build": time.perf_counter() - t0}
        res: dict[str, Any] = {"layout": layout}
        if init is None:  # the reference process: record the initial weights it built
            res["init"] = gather_full_state_dict(chunks)
            init_here = res["init"]
        else:
            init_here = init
        from adapt_pretrain.megatron.reshard import load_full_state_dict

        for name, (cfg, steps) in runs().items():
            load_full_state_dict(chunks, init_here)
            t0 = time.perf_counter()
            res[name] = _adapt_run(info, parallel, model, chunks, cfg, steps, check_resume=name == "adapt")
            # final parameters and gradients (adapt: after the resume check's extra step)
            res[name].update(_gather(chunks) if name == "adapt" else
                             {"params": res[name]["step_params"][-1], "grads": res[name]["step_grads"][-1]})
            timing[name] = time.perf_counter() - t0
        if init is None:  # reference process only: a non-finite loss skips the update everywhere
            res["skip"] = _skip_check(info, parallel, model, chunks, init_here)
        if with_plain:
            load_full_state_dict(chunks, init_here)
            off = _adapt_run(info, parallel, model, chunks, adapt_cfg(enabled=False), 1, trajectory=False)
            off_params = gather_full_state_dict(chunks)
            load_full_state_dict(chunks, init_here)
            plain_loss = _plain_megatron_step(info, chunks, 0)
            plain_params = gather_full_state_dict(chunks)
            res["off_loss"], res["plain_loss"] = off["loss"][0], plain_loss
            res["off_equals_plain"] = all(torch.equal(off_params[k], plain_params[k]) for k in plain_params)
            res["off_max_diff"] = max(float((off_params[k] - plain_params[k]).abs().max()) for k in plain_params)
        t0 = time.perf_counter()
        teardown_parallel()
        timing["teardown"] = time.perf_counter() - t0
        res["timing"] = timing
        results.append(res)
    return encode(results) if rank == 0 else None


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """max over tensors of max|a-b| / max|b| (scale-aware: tolerates rounding in tiny entries)."""
    worst, name = 0.0, ""
    assert a.keys() == b.keys(), (sorted(set(a) ^ set(b)))
    for key in b:
        scale = float(b[key].abs().max())
        diff = float((a[key] - b[key]).abs().max())
        rel = diff / scale if scale > 0 else diff
        if rel > worst or math.isnan(rel):
            worst, name = rel, key
    return worst, name

"""What each spawned rank runs in the DeepSpeed tests: real engines (CPU accelerator, gloo), one
process group reused for every ZeRO stage and mode."""
from __future__ import annotations

import io
import time
from typing import Any

import torch

SEQ = 32
MICRO = 2
GAS = 2
LR = 0.5
ADAPT = {"enabled": True, "tau": 0.05, "refresh_interval": 1000, "num_anchors": 8}


def tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def ds_config(stage: int, clip: float, world: int, gas: int = GAS, bf16: bool = False) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas,
            "train_batch_size": MICRO * gas * world, "gradient_clipping": clip,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def _engine(init: dict[str, torch.Tensor], job: dict[str, Any], world: int, gas: int) -> Any:
    import deepspeed

    model = tiny_llama()
    model.load_state_dict(init)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    config = ds_config(job["stage"], job["clip"], world, gas, job.get("bf16", False))
    config.update(job.get("extra_config", {}))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _full_params(engine: Any, stage: int, master: bool) -> dict[str, torch.Tensor]:
    """Every weight, whole: the module's (fp32 runs) or the optimizer's fp32 master copy (bf16 runs)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    if master:
        return {k: safe_get_full_fp32_param(v).detach().clone() for k, v in params.items()}
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {k: v.detach().clone() for k, v in params.items()}
    return {k: v.detach().clone() for k, v in params.items()}


def adapt_run(init, job: dict[str, Any], my_steps: list[list[dict]], my_anchors: list[dict],
              world: int) -> dict[str, Any]:
    """Train with the DeepSpeed ADAPT adapter; this rank's micro-batches per step."""
    from adapt_pretrain.deepspeed import DeepSpeedAdapt

    engine = _engine(init, job, world, len(my_steps[0]))
    stage, adapt = job["stage"], job["adapt"]
    runner = DeepSpeedAdapt(engine, adapt, domains=["a", "b", "c", "d", "e"])
    results = []
    for micro_batches in my_steps:
        if runner.needs_anchor_refresh():
            runner.refresh_anchors(my_anchors)
        for batch in micro_batches:
            logits = engine(input_ids=batch["tokens"]).logits
            runner.backward(runner.loss(batch, logits))
            result = runner.step()
        results.append(result)
    runner.close()
    metrics = runner.metrics(results[-1])[0]
    return {"params": _full_params(engine, stage, job.get("bf16", False)), "losses": [r.loss for r in results],
            "grad_norms": [r.grad_norm for r in results], "skipped": [r.skipped for r in results],
            "metrics": metrics, "step_time_s": results[-1].step_time_s, "counters": runner.state_dict()["counters"]}


def plain_run(init, job: dict[str, Any], my_steps: list[list[dict]], world: int) -> dict[str, Any]:
    """Plain DeepSpeed training, written out as a user would: masked mean cross-entropy per micro-batch."""
    import torch.nn.functional as F

    engine = _engine(init, job, world, len(my_steps[0]))
    for micro_batches in my_steps:
        for batch in micro_batches:
            logits = engine(input_ids=batch["tokens"]).logits
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1),
                                 reduction="none")
            mask = batch["loss_mask"].reshape(-1).float()
            engine.backward((ce * mask).sum() / mask.sum())
            engine.step()
    return {"params": _full_params(engine, job["stage"], False)}


def refused_run(init, job: dict[str, Any], world: int) -> dict[str, Any]:
    """The error an unsupported engine gets at construction (it must not train with a wrong normaliser)."""
    from adapt_pretrain.deepspeed import DeepSpeedAdapt

    engine = _engine(init, job, world, GAS)
    try:
        DeepSpeedAdapt(engine, job["adapt"])
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": None}


def run_jobs(rank: int, world: int, jobs: list[dict[str, Any]], init: dict, steps_by_rank: list,
             anchors_by_rank: list) -> bytes:
    """Every job in this process group, in order (one group for all stages keeps the test short).

    Results cross the process boundary as bytes: tensors on a multiprocessing queue are shared
    through the sender's file descriptors, which vanish when the worker exits."""
    out = []
    for job in jobs:
        start = time.perf_counter()
        if job["kind"] == "adapt":
            result = adapt_run(init, job, steps_by_rank[rank], anchors_by_rank[rank], world)
        elif job["kind"] == "plain":
            result = plain_run(init, job, steps_by_rank[rank], world)
        else:
            result = refused_run(init, job, world)
        out.append({**result, "seconds": time.perf_counter() - start})
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


def decode(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)

"""ADAPT off is plain training, bit for bit.

The harness (`Trainer` with `adapt.enabled=false`) is compared against a plain megatron-core training
loop written here from scratch: same model/optimiser builders and seed, the same micro-batches,
GPTModel's own loss (`model(tokens, positions, None, labels=labels)`, as megatron's pretrain_gpt) masked
and summed over the step (backward of the sum, megatron's standard `finalize_model_grads`, gradients
scaled by 1 / tokens), AdamW step, LR schedule step: no ADAPT code on the loss path.
Losses and every parameter after 3 steps must be *equal* (torch.equal), not close: the flag must not
perturb a single bit when it is off. Runs in one real gloo process (spawned) so megatron's global
state never leaks into the test process.
"""
from __future__ import annotations

import torch

from tests.distributed_helper import run_distributed

from .conftest import TINY_MODEL

STEPS = 3


def _overrides(data_dir: str, run_dir: str) -> list[str]:
    return [*TINY_MODEL, f"data.data_dir={data_dir}", "data.num_workers=0", f"train.run_dir={run_dir}",
            f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.progress_bar=false", "optim.warmup_steps=1", "adapt.enabled=false", "wandb.enabled=false"]


def _params(chunks) -> dict[str, torch.Tensor]:
    from adapt_pretrain.megatron import unwrap

    return {f"{i}.{k}": v.detach().clone() for i, c in enumerate(chunks) for k, v in unwrap(c).state_dict().items()
            if isinstance(v, torch.Tensor)}


def _harness(cfg) -> tuple[list[float], dict[str, torch.Tensor]]:
    from adapt_pretrain.deepspeed.launcher import read_dist_env
    from adapt_pretrain.megatron import teardown_parallel
    from adapt_pretrain.train import Trainer

    trainer = Trainer(cfg, read_dist_env())
    result = trainer.run()
    params = _params(trainer.chunks)
    trainer.close()
    teardown_parallel()
    return result.losses, params


def _plain(cfg) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A textbook megatron-core loop without any ADAPT code on the loss path."""
    from megatron.core.distributed import finalize_model_grads

    from adapt_pretrain.data.stream import DataStream
    from adapt_pretrain.layout import Layout
    from adapt_pretrain.megatron import build_model, build_optimizer, setup_parallel, teardown_parallel

    setup_parallel(cfg.parallel, cfg.train.seed)
    chunks = build_model(cfg.model, cfg.parallel)
    (model,) = chunks
    optimizer, scheduler = build_optimizer(chunks, cfg.optim)
    data = iter(DataStream(cfg.data, dp_rank=0, dp_size=1))
    losses = []
    for _ in range(STEPS):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss_sum, tokens = 0.0, 0
        for _ in range(Layout.plan(cfg.parallel, cfg.train, 1).num_microbatches):
            batch = next(data)
            b, s = batch["tokens"].shape
            # GPTModel's own loss path (labels given): per-token CE [b, s], as megatron's pretrain_gpt uses it
            ce = model(batch["tokens"], torch.arange(s).unsqueeze(0).expand(b, s), None, labels=batch["labels"])
            mask = batch["loss_mask"].reshape(-1).float()
            micro_sum = torch.sum(ce.reshape(-1).float() * mask)
            micro_sum.backward()
            loss_sum += float(micro_sum.detach().double())
            tokens += int(mask.sum())
        finalize_model_grads(chunks, None)
        model.scale_gradients(1.0 / torch.tensor(float(tokens)))
        optimizer.step()
        scheduler.step(increment=1)
        losses.append(loss_sum / tokens)
    params = _params(chunks)
    teardown_parallel()
    return losses, params


def _compare(rank: int, world: int, data_dir: str, run_dir: str) -> dict:
    from adapt_pretrain.config import load_run_config

    cfg = load_run_config(None, _overrides(data_dir, run_dir))
    harness_losses, harness_params = _harness(cfg)
    cfg = load_run_config(None, _overrides(data_dir, run_dir + "-plain"))
    plain_losses, plain_params = _plain(cfg)
    unequal = [k for k in plain_params if not torch.equal(plain_params[k], harness_params[k])]
    initial_moved = len(plain_params)
    return {"harness": harness_losses, "plain": plain_losses, "unequal": unequal, "n": initial_moved,
            "keys_match": sorted(plain_params) == sorted(harness_params)}


def test_adapt_off_is_bit_identical_to_plain_training(demo_data_dir, tmp_path):
    (out,) = run_distributed(_compare, 1, demo_data_dir, str(tmp_path / "run"), timeout=300)
    assert out["keys_match"] and out["n"] > 0
    assert len(out["harness"]) == STEPS
    assert out["harness"] == out["plain"], (out["harness"], out["plain"])
    assert out["unequal"] == [], out["unequal"][:5]

"""AdamW (megatron-core optimizer) + warm-up/decay LR scheduler for the model chunks.

GPU: bf16 params with fp32 main params and megatron's distributed optimizer (sharded over DP).
CPU: megatron's fp32 optimizer (the bf16 and distributed optimizers hard-code CUDA, see cpu_compat.py;
the clip-grad CUDA assert is redirected in cpu_compat).
The scheduler counts optimizer steps (increment 1 per successful update), not samples.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapt_pretrain.megatron.config import OptimConfig


def build_optimizer(model_chunks: list[nn.Module], optim: OptimConfig) -> tuple[Any, Any]:
    """(MegatronOptimizer, OptimizerParamScheduler) for `model_chunks` as built by build_model."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.utils import get_model_config

    gpu = torch.cuda.is_available()
    model_config = get_model_config(model_chunks[0])
    bf16 = bool(model_config.bf16)
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=gpu,
        decoupled_weight_decay=True,
    )
    optimizer = get_megatron_optimizer(config, model_chunks, use_gloo_process_groups=not gpu)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=optim.total_steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=optim.total_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def _inner_optimizers(optimizer: Any) -> list[Any]:
    return list(optimizer.chained_optimizers) if hasattr(optimizer, "chained_optimizers") else [optimizer]


def _distributed_param_maps(dist_opt: Any):
    """Model params of a DistributedOptimizer in its fixed bucket order (this rank's shards)."""
    for gbuf_range_maps in dist_opt.gbuf_ranges:
        for maps in gbuf_range_maps.values():
            for gbuf_range_map in maps:
                yield from gbuf_range_map["param_map"]


def optimizer_state_dict(optimizer: Any) -> dict[str, Any]:
    """This rank's complete optimizer state, for a same-layout resume.

    megatron's `state_dict()` omits the distributed optimizer's sharded tensors (fp32 main params,
    Adam moments), and its per-rank getters/loaders do not round-trip in 0.16.1 (the
    `dp_reshardable` loader expects a `padding` field only the sharded-checkpoint path adds). So
    each distributed optimizer's shard is saved as {param, exp_avg, exp_avg_sq, step} per model
    param, in the optimizer's own bucket order.
    """
    shards = []
    for inner in _inner_optimizers(optimizer):
        if hasattr(inner, "_get_main_param_and_optimizer_states"):
            shards.append([{k: v.detach().cpu().clone() for k, v in
                            inner._get_main_param_and_optimizer_states(p).items()}
                           for p in _distributed_param_maps(inner)])
        else:
            shards.append(None)
    return {"megatron": optimizer.state_dict(), "distributed_shards": shards}


def load_optimizer_state_dict(optimizer: Any, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state_dict` (same layout)."""
    optimizer.load_state_dict(state["megatron"])  # also allocates the distributed optimizer's state
    for inner, shard in zip(_inner_optimizers(optimizer), state["distributed_shards"]):
        if shard is None:
            continue
        params = list(_distributed_param_maps(inner))
        if len(params) != len(shard):
            raise ValueError(f"optimizer shard has {len(shard)} params, this layout {len(params)}")
        for param, tensors in zip(params, shard):
            device = param.device
            inner._set_main_param_and_optimizer_states(param, {k: v.to(device) for k, v in tensors.items()})
    _unalias_adam_steps(optimizer)


def _unalias_adam_steps(optimizer: Any) -> None:
    """megatron-core 0.16.1's DistributedOptimizer.load_state_dict (no apex/TE) gives every param
    state the SAME `step` tensor; torch's AdamW increments each state's step, so a shared tensor
    would be advanced once per parameter and the bias correction after a resume would be wrong.
    Give each state its own copy."""
    for inner in _inner_optimizers(optimizer):
        torch_opt = getattr(inner, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.Optimizer):
            continue
        for param_state in torch_opt.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.clone()


def current_lr(optimizer: Any) -> float:
    """The learning rate the next update uses (first param group; all share it here)."""
    return float(optimizer.param_groups[0]["lr"])


def apply_optim_config(optim: Any, optimizer: Any, scheduler: Any) -> None:
    """Make the loaded optimiser and LR schedule follow the current optim.* (after --allow-change).

    Loading restores the checkpoint's schedule (megatron's scheduler and param groups carry their
    own lr, min_lr, horizon), so the allowed changes are written into them and the LR recomputed.
    """
    scheduler.init_lr = 0.0 if optim.warmup_steps > 0 else optim.lr
    scheduler.max_lr, scheduler.min_lr = float(optim.lr), float(optim.min_lr)
    scheduler.lr_warmup_steps, scheduler.lr_decay_steps = optim.warmup_steps, optim.total_steps
    scheduler.lr_decay_style = optim.lr_decay_style
    scheduler.start_wd = scheduler.end_wd = optim.weight_decay
    scheduler.wd_incr_steps = optim.total_steps
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = tuple(optim.betas), optim.eps
        if "max_lr" in group:
            group["max_lr"], group["min_lr"] = float(optim.lr), float(optim.min_lr)
    scheduler.step(increment=0)  # the current step's lr and weight decay under the new settings

"""AdamW (megatron-core optimizer) + warm-up/decay LR scheduler for the model chunks.

GPU: bf16 params with fp32 main params and megatron's distributed optimizer (sharded over DP).
CPU: megatron's fp32 optimizer (the bf16 and distributed optimizers hard-code CUDA, DESIGN 3;
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


def current_lr(optimizer: Any) -> float:
    """The learning rate the next update uses (first param group; all share it here)."""
    return float(optimizer.param_groups[0]["lr"])

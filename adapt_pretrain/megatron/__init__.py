"""Megatron-core step engine: GPTModel with ADAPT inside the pipeline schedule, any (TP, PP, DP, VP).

Your own loop: `AdaptMegatron` (docs/PLUGIN.md, "Megatron-core"). Our trainer's step (docs/PARALLELISM.md):
    info = setup_parallel(ParallelConfig(tensor=1, pipeline=2), seed=1234)
    chunks = build_model(model_cfg, parallel_cfg)
    optimizer, scheduler = build_optimizer(chunks, optim_cfg)
    train_step = TrainStep(chunks, optimizer, scheduler, AdaptEngine(adapt_cfg), model_cfg, parallel_cfg, M)
    if train_step.needs_anchor_refresh(step): train_step.refresh_anchors(step, anchor_micro_batches)
    result = train_step(step, micro_batches)
"""
from adapt_pretrain.megatron.config import ModelConfig, OptimConfig, ParallelConfig
from adapt_pretrain.megatron.model import build_model, transformer_config, unwrap
from adapt_pretrain.megatron.optim import build_optimizer
from adapt_pretrain.megatron.parallel import ParallelInfo, parallel_info, setup_parallel, teardown_parallel
from adapt_pretrain.megatron.plugin import AdaptMegatron, StepTotals, default_model_call
from adapt_pretrain.megatron.step import StepResult, TrainStep

__all__ = ["AdaptMegatron", "StepTotals", "default_model_call", "ModelConfig", "OptimConfig", "ParallelConfig", "ParallelInfo", "StepResult", "TrainStep",
           "build_model", "build_optimizer", "parallel_info", "setup_parallel", "teardown_parallel",
           "transformer_config", "unwrap"]

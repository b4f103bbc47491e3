"""Megatron-core step engine: GPTModel with ADAPT inside the pipeline schedule, any (TP, PP, DP, VP).

Typical use (see docs/PARALLELISM.md):
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
from adapt_pretrain.megatron.step import StepResult, TrainStep

__all__ = ["ModelConfig", "OptimConfig", "ParallelConfig", "ParallelInfo", "StepResult", "TrainStep",
           "build_model", "build_optimizer", "parallel_info", "setup_parallel", "teardown_parallel",
           "transformer_config", "unwrap"]

"""DeepSpeed integration: the launcher environment (`launcher`; our megatron-core trainer uses
deepspeed as its launcher only) and ADAPT inside a user's own DeepSpeed engine loop around a
Hugging Face causal LM (`engine.DeepSpeedAdapt`, imported lazily: the launcher needs no deepspeed)."""
from typing import Any

from adapt_pretrain.deepspeed.launcher import DistEnv, configure_threads, init_distributed, read_dist_env, strip_local_rank

__all__ = ["DeepSpeedAdapt", "DistEnv", "StepResult", "configure_threads", "init_distributed", "read_dist_env",
           "strip_local_rank"]


def __getattr__(name: str) -> Any:
    if name in ("DeepSpeedAdapt", "StepResult"):
        from adapt_pretrain.deepspeed import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'adapt_pretrain.deepspeed' has no attribute {name!r}")

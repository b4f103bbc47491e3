"""DeepSpeed integration: launcher environment (`launcher`) and DeepSpeed-style JSON config mapping
(`adapt_pretrain.run_config`). The trainer uses deepspeed as the launcher; the model, optimiser and
pipeline schedule are megatron-core's."""
from adapt_pretrain.deepspeed.launcher import DistEnv, configure_threads, init_distributed, read_dist_env, strip_local_rank

__all__ = ["DistEnv", "configure_threads", "init_distributed", "read_dist_env", "strip_local_rank"]

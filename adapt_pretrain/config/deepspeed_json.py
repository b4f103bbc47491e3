"""DeepSpeed-style JSON keys -> our sections, so people coming from DeepSpeed keep their file.

`train_micro_batch_size_per_gpu`, `gradient_accumulation_steps`, `gradient_clipping`, `optimizer`,
`scheduler`, `bf16`, `zero_optimization`, `steps_per_print`, `wandb` are mapped onto ours; ADAPT
stays in an `"adapt"` section. Keys that only tune DeepSpeed's own engine are accepted silently.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

from adapt_pretrain.config.base import ConfigError

# DeepSpeed keys that carry no meaning for this trainer and are accepted silently (they only tune
# DeepSpeed's own engine, which is not used: megatron-core owns model, optimiser and schedule).
_DS_IGNORED = {"wall_clock_breakdown", "dump_state", "prescale_gradients", "zero_allow_untested_optimizer",
               "memory_breakdown", "communication_data_type", "flops_profiler", "comms_logger"}
_DS_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16", "zero_optimization",
            "steps_per_print", "wandb", "seed"} | _DS_IGNORED
# DeepSpeed keys that are one of our fields under another name
_DS_SCALARS = {"train_micro_batch_size_per_gpu": "train.micro_batch_size", "train_batch_size": "train.global_batch_size",
               "gradient_accumulation_steps": "train.gradient_accumulation_steps",
               "steps_per_print": "train.log_interval", "seed": "train.seed", "gradient_clipping": "optim.clip_grad"}

def _set(raw: dict, path: str, value: Any) -> None:
    section, key = path.split(".", 1)
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"section {section!r} must be a mapping")
    if key in target and target[key] != value:
        raise ConfigError(f"{path} is set twice with different values: {target[key]!r} and {value!r} "
                          f"(once through a DeepSpeed key); keep one")
    target[key] = value


def map_deepspeed_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Translate top-level DeepSpeed keys into our sections; leaves our own sections as they are."""
    out = {k: copy.deepcopy(v) for k, v in raw.items() if k not in _DS_KEYS}
    ds = {k: v for k, v in raw.items() if k in _DS_KEYS}
    for key, path in _DS_SCALARS.items():
        if key in ds:
            _set(out, path, ds[key])
    if "optimizer" in ds:
        opt = ds["optimizer"] or {}
        kind = str(opt.get("type", "AdamW")).lower()
        if kind not in ("adam", "adamw"):
            raise ConfigError(f"optimizer.type={opt.get('type')!r} is not supported; use Adam or AdamW")
        for key, value in dict(opt.get("params") or {}).items():
            if key in ("lr", "weight_decay", "eps", "betas"):
                _set(out, f"optim.{key}", list(value) if key == "betas" else value)
            elif key not in ("torch_adam", "adam_w_mode"):
                raise ConfigError(f"optimizer.params.{key} is not supported (known: lr, betas, eps, weight_decay)")
    if "scheduler" in ds:
        sched = ds["scheduler"] or {}
        kind = sched.get("type")
        styles = {"WarmupCosineLR": "cosine", "WarmupDecayLR": "linear", "WarmupLR": "constant"}
        if kind not in styles:
            raise ConfigError(f"scheduler.type={kind!r} is not supported; use one of {', '.join(styles)}")
        _set(out, "optim.lr_decay_style", styles[kind])
        mapping = {"warmup_num_steps": "optim.warmup_steps", "total_num_steps": "optim.total_steps",
                   "warmup_max_lr": "optim.lr"}
        for key, value in dict(sched.get("params") or {}).items():
            if key in mapping:
                _set(out, mapping[key], value)
            elif key == "cos_min_ratio":
                lr = out.get("optim", {}).get("lr", (sched.get("params") or {}).get("warmup_max_lr"))
                if lr is None:
                    raise ConfigError("scheduler.params.cos_min_ratio needs the peak lr (optimizer.params.lr)")
                _set(out, "optim.min_lr", float(lr) * float(value))
            elif key not in ("warmup_min_lr", "warmup_min_ratio", "warmup_type"):
                raise ConfigError(f"scheduler.params.{key} is not supported "
                                  f"(known: {', '.join(sorted(mapping))}, cos_min_ratio)")
    if "bf16" in ds:
        _set(out, "model.bf16", bool((ds["bf16"] or {}).get("enabled", False)))
    if "fp16" in ds and (ds["fp16"] or {}).get("enabled", False):
        raise ConfigError("fp16.enabled=true is not supported: use bf16 (megatron-core's fp16 loss scaling is not wired)")
    if "zero_optimization" in ds:
        stage = int((ds["zero_optimization"] or {}).get("stage", 0))
        if stage > 1:
            raise ConfigError(f"zero_optimization.stage={stage} is not supported: on GPUs the optimiser state is "
                              "sharded by megatron's distributed optimizer (ZeRO-1 equivalent) automatically; "
                              "use stage 0 or 1")
    if "wandb" in ds:
        for key, value in (ds["wandb"] or {}).items():
            _set(out, f"wandb.{ 'entity' if key == 'team' else key}", value)
    return out


__all__ = ["map_deepspeed_keys"]

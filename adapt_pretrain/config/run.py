"""`RunConfig`: everything one training run needs, from one file plus `key=value` overrides.

One file describes model, data, parallel layout, optimiser, ADAPT, the training loop and monitoring;
it may be YAML with our section names or a DeepSpeed-style JSON (config/deepspeed_json.py).
Validation happens before any process group or model exists, and every error names the offending
field: a typo must fail in the first second, not after the model is built on 512 GPUs. Nothing here
touches the file system beyond reading the config file: the data directory is checked where it is
first used (it may be created by `prepare` on first use).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from adapt_pretrain.config.adapt import AdaptConfig
from adapt_pretrain.config.base import ConfigError, from_dict
from adapt_pretrain.config.derive import derive
from adapt_pretrain.config.files import apply_overrides, check_section_name, read_config_file

SECTIONS = ("adapt", "model", "parallel", "optim", "data", "train", "wandb", "prepare")


def section_classes() -> dict[str, type]:
    """Section name -> dataclass. Imported on call so each part owns its class and this package stays light."""
    from adapt_pretrain.data.config import DataConfig, PrepareConfig
    from adapt_pretrain.megatron.config import ModelConfig, OptimConfig, ParallelConfig
    from adapt_pretrain.monitor.config import WandbConfig
    from adapt_pretrain.training.config import TrainConfig

    return {"adapt": AdaptConfig, "model": ModelConfig, "parallel": ParallelConfig, "optim": OptimConfig,
            "data": DataConfig, "train": TrainConfig, "wandb": WandbConfig, "prepare": PrepareConfig}


@dataclass
class RunConfig:
    """All sections of a run. Build with `load_run_config(path, overrides)` or `RunConfig.from_dict`."""

    adapt: AdaptConfig
    model: Any
    parallel: Any
    optim: Any
    data: Any
    train: Any
    wandb: Any
    prepare: Any = None  # PrepareConfig when the data is prepared on first use (e.g. the demo corpus)
    source: str = ""  # the file it came from (for messages only)
    # optim.total_steps was not given and copies train.steps: a resume that extends train.steps then keeps
    # the checkpoint's LR horizon instead of refusing the (derived) difference.
    total_steps_derived: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<dict>") -> "RunConfig":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
        classes = section_classes()
        for name in raw:
            check_section_name(name, classes, f"{source}: ")
        optim = raw.get("optim")
        total_steps_derived = not (isinstance(optim, Mapping) and "total_steps" in optim)
        raw = derive(raw, SECTIONS, classes["train"], source)
        built: dict[str, Any] = {}
        # train first: data and optim copy values from it, so its own message must come first
        for name in ("train",) + tuple(n for n in SECTIONS if n != "train"):
            values = raw.get(name)
            built[name] = None if values is None else from_dict(classes[name], values, name)
        cfg = cls(**built, source=source, total_steps_derived=total_steps_derived)
        cfg.model.check_layout(cfg.parallel)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for checkpoints, W&B and the config.json written into the run dir)."""
        return {name: dataclasses.asdict(getattr(self, name)) if getattr(self, name) is not None else None
                for name in SECTIONS}


def load_run_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """File (optional) + overrides -> validated RunConfig."""
    raw = read_config_file(path) if path else {}
    raw = apply_overrides(raw, list(overrides or []), section_classes())
    return RunConfig.from_dict(raw, source=path or "<overrides>")


__all__ = ["RunConfig", "SECTIONS", "load_run_config", "section_classes"]

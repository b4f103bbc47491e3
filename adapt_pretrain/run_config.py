"""`RunConfig`: everything one training run needs, from one file plus `key=value` overrides.

One file describes model, data, parallel layout, optimiser, ADAPT, the training loop and
monitoring. It may be YAML with our section names, or a DeepSpeed-style JSON whose DeepSpeed keys
(`train_micro_batch_size_per_gpu`, `gradient_accumulation_steps`, `gradient_clipping`, `optimizer`,
`scheduler`, `bf16`, `zero_optimization`, `steps_per_print`, `wandb`) are mapped onto ours, with ADAPT
in an `"adapt"` section; people coming from DeepSpeed keep their file. Validation happens before
any process group or model exists, and every error names the offending field: a typo must fail in
the first second, not after the model is built on 512 GPUs.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from adapt_pretrain.config import AdaptConfig, ConfigError, dataclass_from_dict


@dataclass
class TrainConfig:
    """The training loop (not the model or the optimiser).

    steps: optimiser steps of the whole run (also the LR schedule's horizon unless optim says otherwise);
        may grow on resume: the schedule then keeps the checkpoint's horizon unless re-planned
        (docs/TRAINING.md, "Extending a run").
    micro_batch_size: sequences per micro-batch per data-parallel rank.
    global_batch_size: sequences per optimiser step over all data-parallel ranks; must be a multiple
        of micro_batch_size * dp. Leave null to use gradient_accumulation_steps instead.
    gradient_accumulation_steps: micro-batches per step per rank when global_batch_size is null (default 1).
    seed: one seed for model init, dropout and data order (each part derives its own streams).
    checkpoint_interval: save every this many steps (0: only at the end); keep_checkpoints: how many to keep.
    run_dir: metrics, checkpoints and the prepared demo data live here.
    max_nonfinite_in_row: stop (with a message) after this many consecutive non-finite steps.
    log_interval: print a line to stdout every this many steps (metrics.jsonl gets every step).
    stop_at_step: end this invocation after that step, leaving the schedule untouched (time-boxed
        jobs and resume tests); null runs to `steps`.
    progress_bar: tqdm bar on rank 0.
    collective_timeout_s: a collective that waits longer than this fails, and the watchdog ends the
        job when a rank completes no step (or start-up, or a checkpoint save) for this long, naming
        the stuck rank (docs/RELIABILITY.md). Minutes, not torch's half-hour default: a stopped rank
        should not idle the whole job for long. Raise it when one step or one save can take longer.
    watchdog: run the hang watchdog (see collective_timeout_s).
    """

    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    seed: int = 1234
    checkpoint_interval: int = 0
    keep_checkpoints: int = 2
    run_dir: str = "runs/default"
    max_nonfinite_in_row: int = 5
    log_interval: int = 10
    stop_at_step: int | None = None
    progress_bar: bool = True
    collective_timeout_s: float = 600.0
    watchdog: bool = True

    def __post_init__(self) -> None:
        def integer(name: str, minimum: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"train.{name}={value!r} must be an integer")
            if value < minimum:
                raise ConfigError(f"train.{name}={value} must be >= {minimum}")

        integer("steps", 1)
        integer("micro_batch_size", 1)
        integer("global_batch_size", 1, optional=True)
        integer("gradient_accumulation_steps", 1, optional=True)
        integer("seed", 0)
        integer("checkpoint_interval", 0)
        integer("keep_checkpoints", 1)
        integer("max_nonfinite_in_row", 1)
        integer("log_interval", 1)
        integer("stop_at_step", 1, optional=True)
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ConfigError(f"train.run_dir={self.run_dir!r} must be a non-empty path")
        for name in ("progress_bar", "watchdog"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"train.{name}={getattr(self, name)!r} must be true or false")
        timeout = self.collective_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise ConfigError(f"train.collective_timeout_s={timeout!r} must be a finite number of seconds > 0")
        self.collective_timeout_s = float(timeout)

    def process_group_timeout_s(self) -> float:
        """Timeout of the process groups' collectives. With the watchdog on it is a margin longer than
        collective_timeout_s, so the watchdog (which names the stuck rank) acts first and a failing
        collective is only the backstop."""
        if not self.watchdog:
            return self.collective_timeout_s
        return self.collective_timeout_s + max(15.0, 0.1 * self.collective_timeout_s)

    def num_microbatches(self, dp: int) -> int:
        """Micro-batches per step on each data-parallel rank for a data-parallel size `dp`."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps or 1
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size * data-parallel size = {self.micro_batch_size} * {dp} = {per_step}")
        gas = self.global_batch_size // per_step
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps != gas:
            raise ConfigError(
                f"train.gradient_accumulation_steps={self.gradient_accumulation_steps} contradicts "
                f"train.global_batch_size={self.global_batch_size} (micro_batch_size={self.micro_batch_size}, "
                f"dp={dp} gives {gas}); set only one of them")
        return gas


def _section_classes() -> dict[str, type]:
    """Section name -> dataclass. Imported here so each part keeps owning its own config class."""
    from adapt_pretrain.data.config import DataConfig, PrepareConfig
    from adapt_pretrain.megatron.config import ModelConfig, OptimConfig, ParallelConfig
    from adapt_pretrain.monitor import WandbConfig

    return {"adapt": AdaptConfig, "model": ModelConfig, "parallel": ParallelConfig, "optim": OptimConfig,
            "data": DataConfig, "train": TrainConfig, "wandb": WandbConfig, "prepare": PrepareConfig}


SECTIONS = ("adapt", "model", "parallel", "optim", "data", "train", "wandb", "prepare")
DEMO_INPUTS = "demo"  # `prepare.inputs: demo` means the corpus bundled with the package
# Set by the trainer from the layout at run time; a user value would be silently wrong.
_RUNTIME_ONLY = {"data": ("dp_rank", "dp_size"), "parallel": ("data",)}


def _derive(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Fill values one section owns from another, so a user states each fact once.

    data.seq_len = model.seq_len, data.micro_batch_size = train.micro_batch_size, data.seed =
    train.seed, optim.total_steps = train.steps (unless given), and the prepare/data directories
    from each other (default: <run_dir>/data). Conflicting explicit values are an error.
    """
    out = {k: copy.deepcopy(dict(v)) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for name in SECTIONS:
        if out.get(name) is None and name != "prepare":
            out[name] = {}
        elif name in out and not isinstance(out[name], dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {type(out[name]).__name__}")
    for section, keys in _RUNTIME_ONLY.items():
        for key in keys:
            if out[section].get(key) is not None:
                raise ConfigError(f"{section}.{key} is derived from the launcher's world size and the layout; remove it")
    defaults = TrainConfig.__dataclass_fields__
    train = out["train"]

    def tie(section: str, key: str, value: Any, origin: str) -> None:
        if value is None:
            return
        if section in out and key in out[section] and out[section][key] != value:
            raise ConfigError(f"{section}.{key}={out[section][key]!r} contradicts {origin}={value!r}; set only {origin}")
        out[section][key] = value

    tie("data", "seq_len", out["model"].get("seq_len"), "model.seq_len")
    tie("data", "micro_batch_size", train.get("micro_batch_size", defaults["micro_batch_size"].default),
        "train.micro_batch_size")
    out["data"].setdefault("seed", train.get("seed", defaults["seed"].default))
    out["optim"].setdefault("total_steps", train.get("steps", defaults["steps"].default))
    if out.get("prepare") is not None:
        prep = out["prepare"]
        if prep.get("inputs") == DEMO_INPUTS:
            from adapt_pretrain.data.demo import demo_corpus_paths

            prep["inputs"] = demo_corpus_paths()
        data_dir = out["data"].get("data_dir") or prep.get("out_dir") or os.path.join(
            train.get("run_dir", defaults["run_dir"].default), "data")
        tie("prepare", "out_dir", data_dir, "data.data_dir")
        out["data"]["data_dir"] = data_dir
        prep.setdefault("progress", False)
    return out


@dataclass
class RunConfig:
    """All sections of a run. Build with `load_run_config(path, overrides)` or `RunConfig.from_dict`."""

    adapt: AdaptConfig
    model: Any
    parallel: Any
    optim: Any
    data: Any
    train: TrainConfig
    wandb: Any
    prepare: Any = None  # PrepareConfig when the data is prepared on first use (e.g. the demo corpus)
    source: str = ""  # the file it came from (for messages only)
    data_pending: dict[str, Any] | None = None  # data section waiting for `prepare` to create its dir
    # optim.total_steps was not given and copies train.steps: a resume that extends train.steps then keeps
    # the checkpoint's LR horizon instead of refusing the (derived) difference.
    total_steps_derived: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<dict>") -> "RunConfig":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
        optim = raw.get("optim")
        total_steps_derived = not (isinstance(optim, Mapping) and "total_steps" in optim)
        raw = _derive(raw, source)
        classes = _section_classes()
        built: dict[str, Any] = {}
        pending = None
        # train first: data and optim copy values from it, so its own message must come first
        for name in ("train",) + tuple(n for n in SECTIONS if n != "train"):
            values = raw.get(name)
            if name == "prepare" and values is None:
                built[name] = None
                continue
            try:
                built[name] = dataclass_from_dict(classes[name], values, section=name)
            except ConfigError as exc:
                # The data dir is created by `prepare` on first use: check the rest, build it later.
                if name == "data" and raw.get("prepare") is not None and "manifest.json" in str(exc):
                    built[name], pending = None, dict(values)
                    continue
                raise
            except TypeError as exc:  # e.g. a required field without a value
                raise ConfigError(f"{source}: section {name!r}: {exc}") from None
        cfg = cls(**built, source=source, data_pending=pending, total_steps_derived=total_steps_derived)
        cfg.model.check_layout(cfg.parallel)
        return cfg

    def data_config(self) -> Any:
        """The DataConfig; builds it now if it was waiting for `prepare` to create the data dir."""
        if self.data is None:
            self.data = dataclass_from_dict(_section_classes()["data"], self.data_pending or {}, section="data")
            self.data_pending = None
        return self.data

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for checkpoints, W&B and the config.json written into the run dir)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            value = getattr(self, name)
            if name == "data" and value is None:
                value = self.data_pending
            out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        out["parallel"].pop("data", None)  # derived at run time
        return out

    def layout(self, world_size: int) -> dict[str, int]:
        """The parallel layout for `world_size` processes; raises ConfigError if it does not divide."""
        tp, pp, vp = self.parallel.tensor, self.parallel.pipeline, self.parallel.virtual_pipeline
        if world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor * parallel.pipeline "
                              f"= {tp} * {pp}")
        dp = world_size // (tp * pp)
        return {"world_size": world_size, "tp": tp, "pp": pp, "vp": int(vp or 1), "dp": dp,
                "micro_batch_size": self.train.micro_batch_size, "num_microbatches": self.train.num_microbatches(dp)}


# ----- DeepSpeed-style JSON -----------------------------------------------------------------------

# DeepSpeed keys that carry no meaning for this trainer and are accepted silently (they only tune
# DeepSpeed's own engine, which is not used: megatron-core owns model, optimiser and schedule).
_DS_IGNORED = {"wall_clock_breakdown", "dump_state", "prescale_gradients", "zero_allow_untested_optimizer",
               "memory_breakdown", "communication_data_type", "flops_profiler", "comms_logger"}
_DS_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16", "zero_optimization",
            "steps_per_print", "wandb", "seed"} | _DS_IGNORED


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
    if "train_micro_batch_size_per_gpu" in ds:
        _set(out, "train.micro_batch_size", ds["train_micro_batch_size_per_gpu"])
    if "train_batch_size" in ds:
        _set(out, "train.global_batch_size", ds["train_batch_size"])
    if "gradient_accumulation_steps" in ds:
        _set(out, "train.gradient_accumulation_steps", ds["gradient_accumulation_steps"])
    if "steps_per_print" in ds:
        _set(out, "train.log_interval", ds["steps_per_print"])
    if "seed" in ds:
        _set(out, "train.seed", ds["seed"])
    if "gradient_clipping" in ds:
        _set(out, "optim.clip_grad", ds["gradient_clipping"])
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


# ----- files and overrides ------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `3e-4` as a float (YAML 1.1 wants `3.0e-4`; nobody writes that)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    __import__("re").compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", __import__("re").X),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass

def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], parsed value). Values are YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.steps=10)")
    path, value = text.split("=", 1)
    parts = [p for p in path.strip().split(".")]
    if len(parts) < 2 or any(not p for p in parts):
        raise ConfigError(f"override {text!r}: the key must be dotted, section.key (e.g. adapt.enabled=true)")
    try:
        parsed = _yaml(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse the value: {exc}") from None
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw config dict; unknown sections/keys fail naming the override."""
    out = copy.deepcopy(raw)
    classes = _section_classes()
    for text in overrides:
        parts, value = parse_override(text)
        section = parts[0]
        if section not in classes:
            raise ConfigError(f"override {text!r}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        known = {f.name for f in dataclasses.fields(classes[section])}
        if parts[1] not in known:
            raise ConfigError(f"override {text!r}: unknown key {section}.{parts[1]}; known: {', '.join(sorted(known))}")
        node = out.setdefault(section, {})
        for key in parts[1:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key} is not a mapping")
        node[parts[-1]] = value
    return out


def read_config_file(path: str) -> dict[str, Any]:
    """Parse YAML or JSON (by extension; YAML otherwise) into a dict with DeepSpeed keys mapped."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        raw = json.loads(text) if path.endswith(".json") else _yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return map_deepspeed_keys(raw)


def load_run_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """File (optional) + overrides -> validated RunConfig."""
    raw = read_config_file(path) if path else {}
    raw = apply_overrides(raw, list(overrides or []))
    return RunConfig.from_dict(raw, source=path or "<overrides>")


__all__ = ["RunConfig", "TrainConfig", "ConfigError", "SECTIONS", "load_run_config", "read_config_file",
           "apply_overrides", "parse_override", "map_deepspeed_keys"]

"""The callbacks a config names (`train.callbacks`): imported, built with their keyword arguments, checked.

Why from the config: a job started by the deepspeed launcher or torchrun has no Python caller to hand
`Trainer(callbacks=[...])` over, so a profiler or an early stop must be switchable from the YAML file
or a `train.callbacks=[...]` override. Every problem is a ConfigError naming `train.callbacks[i]`,
raised when the trainer is built, before any step runs.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping, Sequence

from adapt_pretrain.config.base import ConfigError, suggest
from adapt_pretrain.training.callbacks.base import Callback


def build_configured_callbacks(specs: Sequence[Mapping[str, Any]]) -> list[Callback]:
    """One Callback per spec {"target": "package.module:Name", <keyword arguments>} (as TrainConfig stores them)."""
    return [_build(f"train.callbacks[{index}]", spec) for index, spec in enumerate(specs)]


def _build(path: str, spec: Mapping[str, Any]) -> Callback:
    target = spec["target"]
    module_name, name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{path}: cannot import {module_name} for {target} ({type(exc).__name__}: {exc})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(f"{path}: {module_name} has no callable {name}{suggest(name, public, f'{module_name}:')}")
    arguments = {key: value for key, value in spec.items() if key != "target"}
    try:
        callback = factory(**arguments)
    except (TypeError, ValueError, ConfigError) as exc:
        raise ConfigError(f"{path}: {target}({_describe(arguments)}) failed: {exc}") from None
    if not isinstance(callback, Callback):
        raise ConfigError(f"{path}: {target} gave a {type(callback).__name__}, not a Callback "
                          "(subclass adapt_pretrain.training.callbacks.Callback)")
    return callback


def _describe(arguments: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in arguments.items())

"""Dataclass configs shared by every part of adapt-pretrain.

`AdaptConfig` is the whole user surface of the method: `enabled` is the one flag; every other
field has a default that works (docs/METHOD.md). Validation happens at construction so a bad
value fails at start-up with a message naming the field, not hours into a run.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

SIGNALS = ("embed", "bm25", "embed-static")
NORMALIZE_MODES = ("weights", "tokens", "sum")
POLICIES = ("adapt", "uniform", "linupper")
STANDARDIZE_SCOPES = ("running", "micro_batch")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"adapt.{name}={value!r} is invalid; choose one of {', '.join(allowed)}")


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"adapt.{name}={value!r} must be a number")
    if not math.isfinite(value):
        raise ConfigError(f"adapt.{name}={value!r} must be a finite number")
    return float(value)


def check_finite(path: str, value: Any) -> None:
    """Raise ConfigError naming `path` (e.g. optim.lr) if `value` holds a NaN or an infinity anywhere.

    YAML `.nan`/`.inf`, JSON `NaN`/`Infinity` and overrides such as `optim.lr=.nan` parse as floats and
    pass every range check (a comparison with NaN is always False), so they are refused here, once,
    for every section.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}={value!r} must be a finite number")
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_finite(f"{path}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_finite(f"{path}[{index}]", item)


@dataclass
class AdaptConfig:
    """ADAPT reweighting settings (docs/METHOD.md).

    enabled: the single switch; False gives plain cross-entropy, bit for bit.
    signal: where the score comes from: the model's own hidden states (`embed`), a BM25 score stored
        in the shards at prepare time (`bm25`), or an external encoder's score stored likewise
        (`embed-static`).
    tau: sigmoid temperature; w_min/w_max: clip bounds of the weight.
    standardize: z-score scores with running global statistics before the sigmoid.
    warmup_steps: weights are 1 for steps < warmup_steps.
    refresh_interval: re-encode the anchors every this many steps (and at step 0).
    normalize: `weights` (sum m w l / sum m w, global), `tokens` (/ sum m), or `sum`.
    policy: `adapt` (similarity weights), `uniform` (w = 1), `linupper` (Sow et al. loss reweighting).
    standardize_momentum: EMA factor of the running score mean/variance.
    standardize_scope: `running` (global statistics of previous steps: a group's weight does not depend
        on its batch-mates, but lags a fast-moving model) or `micro_batch` (z-score among the groups of
        the same micro-batch: no lag; equal across parallel layouts for the same micro-batches).
    linupper_d, linupper_r: LinUpper's clip range and softmax temperature.
    num_anchors: anchor documents used (the paper uses 50 per target).
    """

    enabled: bool = False
    signal: str = "embed"
    tau: float = 1.0
    w_min: float = 0.0
    w_max: float = 10.0
    standardize: bool = False
    standardize_momentum: float = 0.5
    standardize_scope: str = "running"
    warmup_steps: int = 0
    refresh_interval: int = 50
    normalize: str = "weights"
    policy: str = "adapt"
    linupper_d: float = 1.0
    linupper_r: float = 1.0
    num_anchors: int = 50

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"adapt.enabled={self.enabled!r} must be true or false")
        if not isinstance(self.standardize, bool):
            raise ConfigError(f"adapt.standardize={self.standardize!r} must be true or false")
        _check_choice("signal", self.signal, SIGNALS)
        _check_choice("normalize", self.normalize, NORMALIZE_MODES)
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("standardize_scope", self.standardize_scope, STANDARDIZE_SCOPES)
        self.tau = _check_number("tau", self.tau)
        if self.tau <= 0:
            raise ConfigError(f"adapt.tau={self.tau} must be > 0")
        self.w_min = _check_number("w_min", self.w_min)
        self.w_max = _check_number("w_max", self.w_max)
        if self.w_min < 0:
            raise ConfigError(f"adapt.w_min={self.w_min} must be >= 0")
        if self.w_max <= 0 or self.w_max < self.w_min:
            raise ConfigError(f"adapt.w_max={self.w_max} must be > 0 and >= w_min={self.w_min}")
        self.standardize_momentum = _check_number("standardize_momentum", self.standardize_momentum)
        if not 0.0 <= self.standardize_momentum < 1.0:
            raise ConfigError(f"adapt.standardize_momentum={self.standardize_momentum} must be in [0, 1)")
        for name in ("warmup_steps", "refresh_interval", "num_anchors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"adapt.{name}={value!r} must be an integer")
        if self.warmup_steps < 0:
            raise ConfigError(f"adapt.warmup_steps={self.warmup_steps} must be >= 0")
        if self.refresh_interval < 1:
            raise ConfigError(f"adapt.refresh_interval={self.refresh_interval} must be >= 1")
        if self.num_anchors < 1:
            raise ConfigError(f"adapt.num_anchors={self.num_anchors} must be >= 1")
        self.linupper_d = _check_number("linupper_d", self.linupper_d)
        self.linupper_r = _check_number("linupper_r", self.linupper_r)
        if self.linupper_d <= 0 or self.linupper_r <= 0:
            raise ConfigError("adapt.linupper_d and adapt.linupper_r must be > 0")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "AdaptConfig":
        """Build from a mapping, rejecting unknown keys by name (a typo must not pass silently)."""
        return dataclass_from_dict(cls, values or {}, section="adapt")


def dataclass_from_dict(cls: type, values: Mapping[str, Any], section: str) -> Any:
    """Instantiate dataclass `cls` from `values`; unknown keys raise ConfigError naming them."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"section {section!r} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {section!r}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key, value in values.items():
        check_finite(f"{section}.{key}", value)
    return cls(**dict(values))


__all__ = ["AdaptConfig", "ConfigError", "dataclass_from_dict", "check_finite", "SIGNALS", "NORMALIZE_MODES", "POLICIES", "field"]

"""Declarative field constraints and the one validator every config section uses.

A section is a dataclass deriving from `Section` whose fields are declared with the helpers below
(`integer`, `number`, `flag`, `choice`, `text`, `texts`, `numbers`); each helper returns a
`dataclasses.field` carrying its rule in the metadata. `Section.__post_init__` checks every declared
field (type, range, choices, finiteness; a bool is never accepted as a number) with a message that
names `section.field=value`, then calls the section's `check()` hook for rules that tie fields
together. Construction does no I/O: paths are checked where they are first used.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import MISSING, dataclass
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence

RULE = "adapt_pretrain.rule"  # metadata key of a field's constraint


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


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


# ----- constraints -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """What one field accepts. `kind` is integer, number, flag, choice, text, texts, numbers or targets.

    minimum / maximum: inclusive bounds; above / below: exclusive bounds (numbers only).
    optional: None is accepted (and kept). options: the allowed values of a choice.
    non_empty: a text or list must not be empty; hint: what to set it to (for the message).
    count: how many values `numbers` holds; split_commas: `texts` given as "a,b" is split.
    """

    kind: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None
    optional: bool = False
    options: tuple[str, ...] = ()
    non_empty: bool = False
    hint: str = ""
    count: Optional[int] = None
    split_commas: bool = False
    as_tuple: bool = False

    def apply(self, path: str, value: Any) -> Any:
        """The value to store (numbers become floats, lists are normalised); ConfigError naming `path` if invalid."""
        if value is None and self.optional:
            return None
        return getattr(self, f"_{self.kind}")(path, value)

    def _range(self, path: str, value: float) -> None:
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{path}={value} must be >= {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"{path}={value} must be <= {self.maximum}")
        if self.above is not None and value <= self.above:
            raise ConfigError(f"{path}={value} must be > {self.above}")
        if self.below is not None and value >= self.below:
            raise ConfigError(f"{path}={value} must be < {self.below}")

    def _integer(self, path: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} must be an integer")
        self._range(path, value)
        return value

    def _number(self, path: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{path}={value!r} must be a finite number")
        self._range(path, value)
        return float(value)

    def _flag(self, path: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value

    def _choice(self, path: str, value: Any) -> str:
        if value not in self.options:
            unset = " (or leave it unset)" if self.optional else ""
            raise ConfigError(f"{path}={value!r} is invalid; choose one of {', '.join(self.options)}{unset}")
        return value

    def _text(self, path: str, value: Any) -> str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string" + (" (or unset)" if self.optional else ""))
        if self.non_empty and not value:
            raise ConfigError(f"{path} must be set" + (f" to {self.hint}" if self.hint else ""))
        return value

    def _texts(self, path: str, value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)):
            value = os.fspath(value)
            value = [v for v in value.split(",") if v] if self.split_commas else [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, os.PathLike)) for v in value):
            raise ConfigError(f"{path}={value!r} must be a list of strings")
        items = [os.fspath(v) for v in value]
        if self.non_empty and not items:
            raise ConfigError(f"{path} is empty" + (f": {self.hint}" if self.hint else ""))
        return tuple(items) if self.as_tuple else items

    def _targets(self, path: str, value: Any) -> list[dict[str, Any]]:
        """Objects to build by import path: "package.module:Name" or {"target": "package.module:Name",
        <keyword arguments>}; stored as mappings (the import itself happens where they are built)."""
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} must be a list of \"package.module:Name\" strings or "
                              "{target: package.module:Name, <arguments>} mappings")
        out = []
        for index, item in enumerate(value):
            spec = {"target": item} if isinstance(item, str) else dict(item) if isinstance(item, Mapping) else None
            target = spec.get("target") if spec is not None else None
            if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
                raise ConfigError(f"{path}[{index}]={item!r} must name what to build as \"package.module:Name\" "
                                  "(a string, or a mapping with that as `target` and keyword arguments beside it)")
            out.append(spec)
        return out

    def _numbers(self, path: str, value: Any) -> tuple[float, ...]:
        if not isinstance(value, (list, tuple)) or (self.count is not None and len(value) != self.count):
            raise ConfigError(f"{path}={value!r} must be a list of {self.count or 'some'} numbers")
        return tuple(self._number(f"{path}[{i}]", v) for i, v in enumerate(value))


def _declare(rule: Rule, default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RULE: rule})


def integer(default: Any = MISSING, *, minimum: Optional[int] = None, maximum: Optional[int] = None,
            optional: bool = False) -> Any:
    """An int (never a bool) within [minimum, maximum]; optional accepts None."""
    return _declare(Rule("integer", minimum=minimum, maximum=maximum, optional=optional), default)


def optional_integer(default: Optional[int] = None, *, minimum: Optional[int] = None) -> Any:
    """An int within bounds, or None (usually: derived from another field, or unlimited)."""
    return integer(default, minimum=minimum, optional=True)


def number(default: Any = MISSING, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
           above: Optional[float] = None, below: Optional[float] = None) -> Any:
    """A finite int or float (never a bool), stored as float; minimum/maximum inclusive, above/below exclusive."""
    return _declare(Rule("number", minimum=minimum, maximum=maximum, above=above, below=below), default)


def numbers(default: tuple[float, ...], *, count: int, minimum: Optional[float] = None,
            below: Optional[float] = None) -> Any:
    """A list of `count` finite numbers, each within bounds; stored as a tuple of floats."""
    return _declare(Rule("numbers", count=count, minimum=minimum, below=below), default)


def flag(default: bool) -> Any:
    """true or false (not 1/0, not "yes")."""
    return _declare(Rule("flag"), default)


def choice(default: Optional[str], options: Sequence[str], *, optional: bool = False) -> Any:
    """One of `options`; optional accepts None (unset)."""
    return _declare(Rule("choice", options=tuple(options), optional=optional), default)


def text(default: Any = MISSING, *, non_empty: bool = False, optional: bool = False, hint: str = "") -> Any:
    """A string (a path-like is turned into one); non_empty refuses "" ("must be set to <hint>")."""
    return _declare(Rule("text", non_empty=non_empty, optional=optional, hint=hint), default)


def texts(*, default: Any = MISSING, default_factory: Any = MISSING, non_empty: bool = False,
          optional: bool = False, split_commas: bool = False, as_tuple: bool = False, hint: str = "") -> Any:
    """A list of strings; one string is one item (or split at commas with split_commas)."""
    rule = Rule("texts", non_empty=non_empty, optional=optional, split_commas=split_commas, as_tuple=as_tuple,
                hint=hint)
    return _declare(rule, default, default_factory)


def targets() -> Any:
    """A list of objects to build by import path (see Rule._targets); empty by default."""
    return _declare(Rule("targets"), default_factory=list)


# ----- sections --------------------------------------------------------------------------------------

class Section:
    """Base of every config section (a dataclass). Subclasses set SECTION and declare fields with the helpers.

    RUNTIME_KEYS: names a user might write but that are derived at run time (refused with that reason).
    """

    SECTION: ClassVar[str] = ""
    RUNTIME_KEYS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            rule = f.metadata.get(RULE)
            if rule is not None:
                value = rule.apply(f"{self.SECTION}.{f.name}", getattr(self, f.name))
                object.__setattr__(self, f.name, value)  # frozen sections too
        self.check()

    def check(self) -> None:
        """Rules that tie several fields together (each field's own rule has been applied already)."""

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]]) -> Any:
        """Build from a mapping, rejecting unknown keys by name (a typo must not pass silently)."""
        return from_dict(cls, values or {}, cls.SECTION)


def suggest(word: str, known: Iterable[str], prefix: str = "") -> str:
    """' (did you mean <prefix><close match>?)' or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def check_keys(cls: type, keys: Iterable[str], section: str, context: str = "") -> None:
    """ConfigError for keys that are not fields of dataclass `cls`: runtime-only ones with the reason,
    others with the closest known key and the list of known keys. `context` prefixes the message."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(keys) - set(known))
    if not unknown:
        return
    runtime = [k for k in unknown if k in getattr(cls, "RUNTIME_KEYS", ())]
    if runtime:
        raise ConfigError(f"{context}{section}.{runtime[0]} is derived from the launcher's world size and the "
                          "layout; remove it")
    hints = ", ".join(f"{section}.{k}{suggest(k, known, f'{section}.')}" for k in unknown)
    raise ConfigError(f"{context}unknown key(s) in {section!r}: {hints}; known: {', '.join(sorted(known))}")


def from_dict(cls: type, values: Mapping[str, Any], section: str) -> Any:
    """Instantiate dataclass `cls` from `values`; unknown keys and non-finite numbers raise ConfigError."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"section {section!r} must be a mapping, got {type(values).__name__}")
    check_keys(cls, values, section)
    for key, value in values.items():
        check_finite(f"{section}.{key}", value)
    try:
        return cls(**dict(values))
    except TypeError as exc:  # e.g. a required field without a value
        raise ConfigError(f"section {section!r}: {exc}") from None


__all__ = ["ConfigError", "Rule", "Section", "check_finite", "check_keys", "choice", "flag",
           "from_dict", "integer", "number", "numbers", "optional_integer", "suggest", "targets", "text", "texts"]

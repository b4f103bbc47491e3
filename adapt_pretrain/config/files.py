"""Reading config files (YAML, or DeepSpeed-style JSON) and applying `section.key=value` overrides."""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Mapping

import yaml

from adapt_pretrain.config.base import ConfigError, check_keys, suggest
from adapt_pretrain.config.deepspeed_json import map_deepspeed_keys


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `3e-4` as a float (YAML 1.1 wants `3.0e-4`; nobody writes that)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
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


def check_section_name(name: str, sections: Mapping[str, type], context: str) -> None:
    """ConfigError `<context>unknown section 'x' (did you mean y?); known: ...` when `name` is not a section."""
    if name not in sections:
        raise ConfigError(f"{context}unknown section {name!r}{suggest(name, sections)}; known: {', '.join(sections)}")


def apply_overrides(raw: Mapping[str, Any], overrides: list[str], sections: Mapping[str, type] | None = None
                    ) -> dict[str, Any]:
    """Apply dotted overrides to a raw config dict; unknown sections/keys fail naming the override and the
    closest known name. `sections`: section name -> class (default: the run config's)."""
    if sections is None:
        from adapt_pretrain.config.run import section_classes

        sections = section_classes()
    out = copy.deepcopy(dict(raw))
    for text in overrides:
        parts, value = parse_override(text)
        section = parts[0]
        check_section_name(section, sections, f"override {text!r}: ")
        check_keys(sections[section], [parts[1]], section, f"override {text!r}: ")
        node = out.setdefault(section, {})
        for key in parts[1:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key} is not a mapping")
        node[parts[-1]] = value
    return out


def read_config_file(path: str, deepspeed_keys: bool = True) -> dict[str, Any]:
    """Parse YAML or JSON (by extension; YAML otherwise) into a dict with DeepSpeed keys mapped (unless
    `deepspeed_keys` is False: files of another layout, such as `compare`'s)."""
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
    return map_deepspeed_keys(raw) if deepspeed_keys else raw


__all__ = ["apply_overrides", "check_section_name", "parse_override", "read_config_file"]

"""Cross-section ties: values one section owns are filled from another, so a user states each fact once."""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping

from adapt_pretrain.config.base import ConfigError

DEMO_INPUTS = "demo"  # `prepare.inputs: demo` names the bundled corpus; `prepare` expands it (data/demo.py)


def derive(raw: Mapping[str, Any], sections: tuple[str, ...], train_defaults: Any, source: str) -> dict[str, Any]:
    """Fill data.seq_len = model.seq_len, data.micro_batch_size = train.micro_batch_size, data.seed =
    train.seed, optim.total_steps = train.steps (unless given), and the prepare/data directories from
    each other (default: <run_dir>/data). Conflicting explicit values are an error.

    `train_defaults`: the train section's class (its field defaults apply when train omits a value).
    Every section but `prepare` becomes a mapping (empty when absent); `prepare` stays None when absent.
    """
    out = {k: copy.deepcopy(dict(v)) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for name in sections:
        if out.get(name) is None and name != "prepare":
            out[name] = {}
        elif name in out and not isinstance(out[name], dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {type(out[name]).__name__}")
    defaults = {name: f.default for name, f in train_defaults.__dataclass_fields__.items()}
    train = {**defaults, **out["train"]}

    def tie(section: str, key: str, value: Any, origin: str) -> None:
        if value is None:
            return
        if key in out[section] and out[section][key] != value:
            raise ConfigError(f"{section}.{key}={out[section][key]!r} contradicts {origin}={value!r}; set only {origin}")
        out[section][key] = value

    tie("data", "seq_len", out["model"].get("seq_len"), "model.seq_len")
    tie("data", "micro_batch_size", train["micro_batch_size"], "train.micro_batch_size")
    out["data"].setdefault("seed", train["seed"])
    out["optim"].setdefault("total_steps", train["steps"])
    if out.get("prepare") is not None:
        prep = out["prepare"]
        data_dir = out["data"].get("data_dir") or prep.get("out_dir") or os.path.join(train["run_dir"], "data")
        tie("prepare", "out_dir", data_dir, "data.data_dir")
        out["data"]["data_dir"] = data_dir
        prep.setdefault("progress", False)
    return out


__all__ = ["DEMO_INPUTS", "derive"]

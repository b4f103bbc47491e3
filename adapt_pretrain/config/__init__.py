"""Configuration: one declarative validator (base.py) for every section, and the run config that holds them.

- base.py: `ConfigError`, the field helpers (`integer`, `number`, `flag`, `choice`, `text`, ...), `Section`,
  `from_dict` (unknown keys -> "did you mean"), `check_finite`.
- adapt.py: `AdaptConfig`. The other sections live with the part they configure: `data/config.py`,
  `megatron/config.py`, `training/config.py`, `monitor/config.py`; `run.py` lists them (`SECTIONS`).
- files.py: YAML/JSON reading and `section.key=value` overrides; deepspeed_json.py: DeepSpeed keys;
  derive.py: values one section takes from another.

Importing this package stays light (stdlib + yaml): the section classes are imported on first use.
"""
from adapt_pretrain.config.adapt import NORMALIZE_MODES, POLICIES, SIGNALS, AdaptConfig
from adapt_pretrain.config.base import ConfigError, Section, check_finite, from_dict
from adapt_pretrain.config.deepspeed_json import map_deepspeed_keys
from adapt_pretrain.config.files import apply_overrides, parse_override, read_config_file
from adapt_pretrain.config.run import SECTIONS, RunConfig, load_run_config

__all__ = ["AdaptConfig", "ConfigError", "NORMALIZE_MODES", "POLICIES", "RunConfig", "SECTIONS", "SIGNALS", "Section",
           "apply_overrides", "check_finite", "from_dict", "load_run_config",
           "map_deepspeed_keys", "parse_override", "read_config_file"]

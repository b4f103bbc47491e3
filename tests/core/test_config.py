"""AdaptConfig: defaults are valid, every invalid value fails with a message naming the field."""
import pytest

from adapt_pretrain.config import AdaptConfig, ConfigError


def test_defaults_are_valid_and_off():
    cfg = AdaptConfig()
    assert cfg.enabled is False and cfg.signal == "embed" and cfg.normalize == "weights"


@pytest.mark.parametrize("field,value", [
    ("standardize_scope", "global"),
    ("signal", "cosine"), ("normalize", "mean"), ("policy", "doremi"), ("tau", 0.0), ("tau", -1),
    ("tau", "hot"), ("w_min", -0.1), ("w_max", 0.0), ("refresh_interval", 0), ("warmup_steps", -1),
    ("enabled", "yes"), ("standardize", 1), ("num_anchors", 0), ("standardize_momentum", 1.0),
    ("refresh_interval", 2.5), ("linupper_d", 0), ("linupper_r", -1.0),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        AdaptConfig(**{field: value})


def test_w_max_below_w_min_rejected():
    with pytest.raises(ConfigError, match="w_max"):
        AdaptConfig(w_min=0.5, w_max=0.2)


def test_unknown_key_rejected_by_name():
    with pytest.raises(ConfigError, match="temperature"):
        AdaptConfig.from_dict({"enabled": True, "temperature": 2.0})


def test_from_dict_sets_values():
    cfg = AdaptConfig.from_dict({"enabled": True, "tau": 0.5, "policy": "linupper"})
    assert (cfg.enabled, cfg.tau, cfg.policy) == (True, 0.5, "linupper")

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


# ----- every section's declared constraints --------------------------------------------------------

import dataclasses  # noqa: E402
import math  # noqa: E402

from adapt_pretrain.config import SECTIONS  # noqa: E402
from adapt_pretrain.config.base import RULE  # noqa: E402
from adapt_pretrain.config.run import section_classes  # noqa: E402

# the smallest valid values of each section's required fields (no file needs to exist)
VALID = {"model": dict(vocab_size=1000, seq_len=64, hidden_size=64, num_layers=4, num_attention_heads=4),
         "data": dict(data_dir="/nonexistent/data"),
         "prepare": dict(inputs=["/nonexistent/x.jsonl"], out_dir="/nonexistent/out")}


def _wrong_values(rule) -> list:
    """Values the field must refuse, chosen from its declared kind and bounds (not from the validator)."""
    if rule.kind == "integer":
        bad = ["3", 2.5, True]
    elif rule.kind == "number":
        bad = ["x", True, math.nan, math.inf]
    elif rule.kind == "flag":
        bad = [1, "yes", None]
    elif rule.kind == "choice":
        bad = ["no-such-option", 3]
    elif rule.kind == "text":
        bad = [3, ["a"]]
    elif rule.kind == "texts":
        bad = [[3], 4.5]
    elif rule.kind == "targets":
        bad = ["pkg.mod:Name", ["no_colon"], [{"arguments": 1}], [":Name"], [3]]
    else:
        assert rule.kind == "numbers", rule
        bad = ["x", [0.5], [0.5, "y"], [0.5, True]]
    for bound, delta in (("minimum", -1), ("maximum", 1)):
        limit = getattr(rule, bound)
        if limit is not None:
            bad.append(limit + delta if rule.kind != "numbers" else [limit + delta] * rule.count)
    for bound in ("above", "below"):
        limit = getattr(rule, bound)
        if limit is not None:
            bad.append(limit)
    if not rule.optional and rule.kind != "flag":
        bad.append(None)
    return bad


CASES = [(name, f.name, value) for name in SECTIONS for f in dataclasses.fields(section_classes()[name])
         for value in _wrong_values(f.metadata[RULE])]


def test_every_field_of_every_section_declares_a_rule():
    for name in SECTIONS:
        cls = section_classes()[name]
        assert cls.SECTION == name
        undeclared = [f.name for f in dataclasses.fields(cls) if RULE not in f.metadata]
        assert not undeclared, (name, undeclared)


@pytest.mark.parametrize("section, field, value", CASES, ids=[f"{s}.{f}={v!r}" for s, f, v in CASES])
def test_declared_rules_refuse_wrong_values_naming_the_field(section, field, value):
    cls = section_classes()[section]
    with pytest.raises(ConfigError) as err:
        cls(**{**VALID.get(section, {}), field: value})
    assert f"{section}.{field}" in str(err.value)


def test_defaults_of_every_section_are_valid_and_numbers_become_floats():
    for name in SECTIONS:
        section = section_classes()[name](**VALID.get(name, {}))
        for f in dataclasses.fields(section):
            if f.metadata[RULE].kind == "number":
                assert type(getattr(section, f.name)) is float, (name, f.name)
    assert type(AdaptConfig(tau=2).tau) is float


@pytest.mark.parametrize("values, message", [
    ({"enabeld": True}, r"adapt\.enabeld \(did you mean adapt\.enabled\?\)"),
    ({"warmup_step": 3}, r"adapt\.warmup_step \(did you mean adapt\.warmup_steps\?\)"),
    ({"qqqqq": 1}, r"unknown key\(s\) in 'adapt': adapt\.qqqqq; known: enabled, "),
])
def test_unknown_keys_get_the_closest_known_key(values, message):
    with pytest.raises(ConfigError, match=message):
        AdaptConfig.from_dict(values)

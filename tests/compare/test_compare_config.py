"""The comparison's config follows the config system's rules: each field's declared rule, unknown keys
with the closest known one, dotted overrides checked against the section they name."""
from __future__ import annotations

import pytest
import yaml

from adapt_pretrain.config import ConfigError
from adapt_pretrain.experiments.methods.plan import CompareConfig, SelectionConfig, load_compare_config

RUN = {"model": {"vocab_size": 64, "seq_len": 8, "hidden_size": 8, "num_layers": 1, "num_attention_heads": 2},
       "train": {"steps": 4, "micro_batch_size": 2}}


def _file(tmp_path, **extra) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "prepare": {"vocab_size": 300}, "run": RUN,
                                    "methods": ["uniform"], "seeds": [1], **extra}))
    return str(path)


@pytest.mark.parametrize("values, message", [
    ({"fraction": 0.0}, "selection.fraction=0.0 must be > 0.0"),
    ({"fraction": 1.5}, "selection.fraction=1.5 must be <= 1.0"),
    ({"fraction": True}, "selection.fraction=True must be a number"),
    ({"proxy_steps": 0}, "selection.proxy_steps=0 must be >= 1"),
    ({"proxy_steps": 2.5}, "selection.proxy_steps=2.5 must be an integer"),
    ({"proxy_seed": -1}, "selection.proxy_seed=-1 must be >= 0"),
    ({"embed_prefix": 0}, "selection.embed_prefix=0 must be >= 1"),
    ({"fracton": 0.5}, r"selection.fracton \(did you mean selection.fraction\?\)"),
])
def test_selection_rules(values, message):
    with pytest.raises(ConfigError, match=message):
        SelectionConfig.from_dict(values)
    with pytest.raises(ConfigError, match=message):  # nested in the comparison's config too
        CompareConfig.from_dict({"out_dir": "o", "prepare": {}, "run": RUN, "methods": ["uniform"],
                                 "selection": values})
    assert SelectionConfig.from_dict({"fraction": 1, "embed_prefix": None}).fraction == 1.0  # stored as float


@pytest.mark.parametrize("values, message", [
    ({"out_dir": ""}, "compare.out_dir must be set"),
    ({"methods": []}, "compare.methods is empty"),
    ({"methods": "uniform,bogus"}, "unknown method 'bogus'"),
    ({"seeds": [1, 1]}, "distinct"),
    ({"seeds": [1.5]}, "integers"),
    ({"data_seed": -1}, "compare.data_seed=-1 must be >= 0"),
    ({"method_overrides": {"adaptt": []}}, r"unknown method 'adaptt' \(did you mean adapt\?\)"),
    ({"prepare": {"vocab_sise": 300}}, r"prepare.vocab_sise \(did you mean prepare.vocab_size\?\)"),
    ({"eval": {"max_tokns": 5}}, r"eval.max_tokns \(did you mean eval.max_tokens\?\)"),
    ({"eval": {"docs": 0}}, "eval.docs=0 must be >= 1"),
    ({"static_mix": {"weight": {}}}, r"static_mix.weight \(did you mean static_mix.weights\?\)"),
    ({"run": []}, "run must be a mapping"),
])
def test_compare_rules(values, message):
    base = {"out_dir": "o", "prepare": {}, "run": RUN, "methods": ["uniform"]}
    with pytest.raises(ConfigError, match=message):
        CompareConfig.from_dict({**base, **values})


def test_unknown_keys_and_overrides_name_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key.*compare.seed \(did you mean compare.seeds\?\)"):
        load_compare_config(_file(tmp_path, seed=[1]), corpus=["demo"])
    cases = {"selection.fracton=0.5": r"selection.fracton \(did you mean selection.fraction\?\)",
             "evl.docs=3": r"unknown section 'evl' \(did you mean eval\?\)",
             "run.trian.steps=3": r"run.trian \(did you mean run.train\?\)",
             "selection.fraction=2": "selection.fraction=2 must be <= 1.0",
             "eval.docs=.nan": "eval.docs=nan"}
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_compare_config(_file(tmp_path), corpus=["demo"], overrides=(override,))
    cfg = load_compare_config(_file(tmp_path), corpus=["demo"],
                              overrides=("selection.fraction=0.5", "eval.extra=[x.jsonl]", "static_mix.weights={a: 1}"))
    assert cfg.selection.fraction == 0.5 and cfg.eval_extra[0].endswith("x.jsonl") and cfg.static_mix["weights"] == {"a": 1}


def test_event_lines_prefix_every_line():
    import logging
    import re

    from adapt_pretrain.experiments.compare import EventFormatter

    record = logging.LogRecord("adapt_pretrain.experiments.pipeline", logging.ERROR, __file__, 1,
                               "FAILED %s\n--- tail ---\nTraceback", ("uniform",), None)
    lines = EventFormatter().format(record).split("\n")
    assert len(lines) == 3 and all(re.match(r"\[compare \d\d:\d\d:\d\d\] ", line) for line in lines), lines
    assert lines[0].endswith("] FAILED uniform") and lines[2].endswith("] Traceback")

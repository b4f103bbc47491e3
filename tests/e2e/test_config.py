"""Run config: YAML and DeepSpeed-style JSON loading, dotted overrides, validation messages.

Every error must name the offending field, so each test asserts on the field name in the message.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from adapt_pretrain.checkpointing import CheckpointError, check_resume_compatible, consent_problems, consented_changes
from adapt_pretrain.config import ConfigError
from adapt_pretrain.config import load_run_config
from adapt_pretrain.layout import Layout

from .conftest import TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_yaml(tmp_path, data) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def base(data_dir: str) -> dict:
    return {"model": {"vocab_size": 1024, "seq_len": 32, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4},
            "data": {"data_dir": data_dir, "num_workers": 0},
            "train": {"steps": 5, "micro_batch_size": 2, "global_batch_size": 8},
            "adapt": {"enabled": True}}


def test_yaml_loads_and_derives(tmp_path, demo_data_dir):
    cfg = load_run_config(write_yaml(tmp_path, base(demo_data_dir)), ["train.steps=7", "adapt.tau=0.5"])
    assert cfg.train.steps == 7 and cfg.adapt.tau == 0.5 and cfg.adapt.enabled is True
    assert cfg.data.seq_len == 32 and cfg.data.micro_batch_size == 2  # stated once, in model/train
    assert cfg.optim.total_steps == 7  # the LR horizon follows train.steps unless given
    layout = Layout.plan(cfg.parallel, cfg.train, 2)
    assert layout.as_dict() == {"world_size": 2, "tp": 1, "pp": 1, "vp": 1, "dp": 2, "micro_batch_size": 2,
                                "num_microbatches": 2}  # as checkpoints store it (meta "layout")


@pytest.mark.parametrize("override, field", [
    ("adapt.tau=-1", "adapt.tau"),
    ("adapt.normalize=mean", "adapt.normalize"),
    ("adapt.enabeld=true", "adapt.enabeld"),
    ("trian.steps=3", "trian"),
    ("train.steps=0", "train.steps"),
    ("train.micro_batch_size=two", "train.micro_batch_size"),
    ("model.num_attention_heads=5", "model.num_attention_heads"),
    ("optim.lr_decay_style=step", "optim.lr_decay_style"),
    ("data.mode=sometimes", "data.mode"),
    ("data.seq_len=64", "data.seq_len"),
    ("parallel.data=2", "parallel.data"),
])
def test_bad_values_name_the_field(tmp_path, demo_data_dir, override, field):
    with pytest.raises(ConfigError) as err:
        load_run_config(write_yaml(tmp_path, base(demo_data_dir)), [override])
    assert field in str(err.value)


@pytest.mark.parametrize("override, hint", [
    ("adapt.enabeld=true", "did you mean adapt.enabled?"),
    ("trian.steps=3", "did you mean train?"),
    ("optim.min_rl=0.1", "did you mean optim.min_lr?"),
])
def test_misspelt_overrides_get_a_suggestion(tmp_path, demo_data_dir, override, hint):
    with pytest.raises(ConfigError) as err:
        load_run_config(write_yaml(tmp_path, base(demo_data_dir)), [override])
    assert hint in str(err.value) and override in str(err.value)


@pytest.mark.parametrize("override, field", [
    ("data.dp_rank=1", "data.dp_rank"), ("data.dp_size=2", "data.dp_size"), ("parallel.data=2", "parallel.data")])
def test_runtime_values_are_refused_with_the_reason(tmp_path, demo_data_dir, override, field):
    """The data-parallel coordinates come from the launcher's world size, never from the config."""
    for attempt in ([override], None):
        data = base(demo_data_dir)
        if attempt is None:  # the same key written in the file
            section, key = field.split(".")
            data.setdefault(section, {})[key] = 2
        with pytest.raises(ConfigError) as err:
            load_run_config(write_yaml(tmp_path, data), attempt)
        assert f"{field} is derived from the launcher's world size" in str(err.value)


@pytest.mark.parametrize("override", ["train.steps", "steps=3", ".steps=3", "train.=3"])
def test_malformed_overrides(tmp_path, demo_data_dir, override):
    with pytest.raises(ConfigError, match="override"):
        load_run_config(write_yaml(tmp_path, base(demo_data_dir)), [override])


def test_unknown_section_and_key_in_file(tmp_path, demo_data_dir):
    data = base(demo_data_dir)
    data["modle"] = {}
    with pytest.raises(ConfigError, match="modle.*did you mean model\\?"):
        load_run_config(write_yaml(tmp_path, data))
    data = base(demo_data_dir)
    data["train"]["stpes"] = 3
    with pytest.raises(ConfigError, match="stpes.*did you mean train.steps\\?"):
        load_run_config(write_yaml(tmp_path, data))
    data = base(demo_data_dir)
    data["train"]["zzzz"] = 3  # nothing close: no guess, but the known keys are listed
    with pytest.raises(ConfigError) as err:
        load_run_config(write_yaml(tmp_path, data))
    assert "did you mean" not in str(err.value) and "known: " in str(err.value) and "micro_batch_size" in str(err.value)


def test_batch_divisibility(tmp_path, demo_data_dir):
    cfg = load_run_config(write_yaml(tmp_path, base(demo_data_dir)), ["train.global_batch_size=6"])
    with pytest.raises(ConfigError, match="train.global_batch_size=6"):
        Layout.plan(cfg.parallel, cfg.train, 2)
    cfg = load_run_config(write_yaml(tmp_path, base(demo_data_dir)), ["parallel.pipeline=2"])
    with pytest.raises(ConfigError, match="parallel.tensor"):
        Layout.plan(cfg.parallel, cfg.train, 3)


def test_deepspeed_json(tmp_path, demo_data_dir):
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
        "gradient_clipping": 0.5,
        "steps_per_print": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 2, "total_num_steps": 50,
                                                           "cos_min_ratio": 0.1}},
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 1},
        "wall_clock_breakdown": False,
        "adapt": {"enabled": True, "tau": 2.0},
        "model": base(demo_data_dir)["model"],
        "data": {"data_dir": demo_data_dir},
        "train": {"steps": 9},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = load_run_config(str(path))
    assert (cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, cfg.train.log_interval) == (2, 3, 4)
    assert Layout.plan(cfg.parallel, cfg.train, 2).num_microbatches == 3
    assert cfg.optim.clip_grad == 0.5 and cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.eps == 1e-6 and cfg.optim.weight_decay == 0.01
    assert (cfg.optim.warmup_steps, cfg.optim.total_steps, cfg.optim.lr_decay_style) == (2, 50, "cosine")
    assert cfg.optim.min_lr == pytest.approx(1e-4)
    assert cfg.model.bf16 is True and cfg.adapt.tau == 2.0 and cfg.train.steps == 9

    for bad, field in [({"optimizer": {"type": "Lamb"}}, "optimizer.type"),
                       ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
                       ({"fp16": {"enabled": True}}, "fp16"),
                       ({"scheduler": {"type": "OneCycle"}}, "scheduler.type"),
                       ({"train_micro_batch_size_per_gpu": 4, "train": {"micro_batch_size": 2}}, "train.micro_batch_size"),
                       ({"optimizer": {"type": "Adam", "params": {"amsgrad": True}}}, "optimizer.params.amsgrad")]:
        path.write_text(json.dumps({**ds, **bad}))
        with pytest.raises(ConfigError) as err:
            load_run_config(str(path))
        assert field in str(err.value), (bad, str(err.value))


def test_resume_compatibility_names_fields():
    config = {"train": {"steps": 10, "log_interval": 1, "micro_batch_size": 2}, "adapt": {"tau": 1.0}}
    layout = {"world_size": 2, "tp": 1, "pp": 1, "dp": 2, "micro_batch_size": 2, "num_microbatches": 2}
    meta = {"step": 4, "config": config, "layout": layout}
    # safe: more steps, different logging, another layout with the same global batch (8 sequences)
    check_resume_compatible(meta, {**config, "train": {**config["train"], "steps": 20, "log_interval": 5}}, layout)
    check_resume_compatible(meta, config, {**layout, "pp": 2, "dp": 1, "num_microbatches": 4})
    with pytest.raises(CheckpointError) as err:
        check_resume_compatible(meta, {**config, "adapt": {"tau": 2.0}}, {**layout, "dp": 1})
    text = str(err.value)
    assert "adapt.tau" in text and "the global batch changed: 8 sequences per step" in text and "-> 4 (now" in text


def test_optim_changes_need_consent_and_are_reported():
    config = {"train": {"steps": 10}, "optim": {"lr": 1e-3, "min_lr": 1e-4, "total_steps": 10}, "adapt": {"tau": 1.0}}
    layout = {"world_size": 1}
    meta = {"step": 4, "config": config, "layout": layout}
    lower = {**config, "optim": {**config["optim"], "lr": 1e-4, "min_lr": 1e-5}}
    with pytest.raises(CheckpointError) as err:
        check_resume_compatible(meta, lower, layout)
    assert "optim.lr: 0.001 (checkpoint) -> 0.0001 (now)" in str(err.value) and "--allow-change" in str(err.value)
    check_resume_compatible(meta, lower, layout, allow=("optim.lr", "optim.min_lr"))
    assert consented_changes(config, lower, ("optim.*",)) == [("optim.lr", 1e-3, 1e-4), ("optim.min_lr", 1e-4, 1e-5)]
    with pytest.raises(CheckpointError, match="optim.min_lr"):  # only the named fields
        check_resume_compatible(meta, lower, layout, allow=("optim.lr",))
    assert consent_problems(["optim.lr", "optim.*", "adapt.tau", "model.hidden_size"]) == ["adapt.tau",
                                                                                           "model.hidden_size"]


def test_total_steps_derivation_is_recorded(demo_data_dir):
    assert load_run_config(None, [*TINY_MODEL, f"data.data_dir={demo_data_dir}"]).total_steps_derived
    cfg = load_run_config(None, [*TINY_MODEL, f"data.data_dir={demo_data_dir}", "optim.total_steps=50"])
    assert not cfg.total_steps_derived and cfg.optim.total_steps == 50


def test_cli_reports_config_error(tmp_path, demo_data_dir):
    """A real process: bad config exits with code 2 and a one-line message naming the field."""
    proc = subprocess.run([sys.executable, "-m", "adapt_pretrain.train", "--config",
                           write_yaml(tmp_path, base(demo_data_dir)), "adapt.w_max=-3"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "adapt.w_max" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "adapt_pretrain.train", "--config", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_cli_refuses_an_unprepared_data_dir(tmp_path, demo_data_dir):
    """The config names a directory without manifest.json (and no `prepare` section): the trainer
    refuses it where it first uses it, as a config error naming the field."""
    missing = tmp_path / "never-prepared"
    proc = subprocess.run([sys.executable, "-m", "adapt_pretrain.train", "--config",
                           write_yaml(tmp_path, base(demo_data_dir)), f"data.data_dir={missing}",
                           f"train.run_dir={tmp_path / 'run'}", "wandb.enabled=false"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"data.data_dir='{missing}' has no manifest.json" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_rejects_allow_change_outside_optim(tmp_path, demo_data_dir):
    proc = subprocess.run([sys.executable, "-m", "adapt_pretrain.train", "--config",
                           write_yaml(tmp_path, base(demo_data_dir)), "--resume", "--allow-change", "optim.lr,adapt.tau"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--allow-change adapt.tau" in proc.stderr and "only optim.*" in proc.stderr

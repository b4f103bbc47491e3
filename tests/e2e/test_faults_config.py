"""Config faults: non-finite numbers, a bad `wandb` section, the demo command and the demo's anchors.

Every refusal must name the offending field; the demo command must run the demo config end to end
(training, then the report) and a run asking for more anchors than the data has must say so.
"""
from __future__ import annotations

import gzip
import json
import math
import os

import pytest
import yaml

from adapt_pretrain.config import ConfigError
from adapt_pretrain.config import load_run_config

from .conftest import TINY_MODEL
from .helpers import PYTHON, REPO, run, train_plain

DEMO = os.path.join(REPO, "launch", "configs", "demo-cpu.yaml")


def base(data_dir: str) -> list[str]:
    return [*TINY_MODEL, f"data.data_dir={data_dir}", "train.micro_batch_size=2"]


@pytest.mark.parametrize("override, field", [
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.min_lr=-.inf", "optim.min_lr"),
    ("optim.betas=[0.9, .nan]", "optim.betas"),
    ("optim.weight_decay=.NaN", "optim.weight_decay"),
    ("adapt.tau=.nan", "adapt.tau"),
    ("adapt.w_max=.inf", "adapt.w_max"),
    ("model.init_method_std=.nan", "model.init_method_std"),
    ("train.collective_timeout_s=.inf", "train.collective_timeout_s"),
    ("wandb.init_timeout=.nan", "wandb.init_timeout"),
])
def test_non_finite_numbers_are_refused(demo_data_dir, override, field):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, [*base(demo_data_dir), override])
    assert field in str(err.value) and "finite" in str(err.value)


def test_non_finite_in_a_deepspeed_json_and_a_prepare_section(demo_data_dir, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": math.nan}},
                                "model": {"vocab_size": 1024, "seq_len": 32, "hidden_size": 32, "num_layers": 2,
                                          "num_attention_heads": 4},
                                "data": {"data_dir": demo_data_dir}}))
    assert "NaN" in path.read_text()
    with pytest.raises(ConfigError, match="optim.lr"):
        load_run_config(str(path))
    with pytest.raises(ConfigError, match="prepare.bm25_k1"):
        load_run_config(DEMO, [f"data.data_dir={demo_data_dir}", "prepare.bm25_k1=.inf"])


def test_non_finite_learning_rate_stops_the_trainer_at_once(demo_data_dir, tmp_path):
    proc = train_plain([*base(demo_data_dir), f"train.run_dir={tmp_path / 'run'}", "optim.lr=.nan"], check=False)
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "optim.lr=nan must be a finite number" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, field", [
    ("wandb.histogram_interval=abc", "wandb.histogram_interval"),
    ("wandb.table_interval=-1", "wandb.table_interval"),
    ("wandb.mode=onlin", "wandb.mode"),
    ("wandb.enabled=maybe", "wandb.enabled"),
    ("wandb.project=", "wandb.project"),
    ("wandb.tags=3", "wandb.tags"),
    ("wandb.init_timeout=0", "wandb.init_timeout"),
    ("wandb.background=1", "wandb.background"),
])
def test_wandb_section_is_validated(demo_data_dir, override, field):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, [*base(demo_data_dir), override])
    assert field in str(err.value)


def test_wandb_section_accepts_good_values(demo_data_dir):
    cfg = load_run_config(None, [*base(demo_data_dir), "wandb.mode=offline", "wandb.tags=[a, b]",
                                 "wandb.histogram_interval=0", "wandb.init_timeout=5"])
    assert cfg.wandb.tags == ("a", "b") and cfg.wandb.histogram_interval == 0 and cfg.wandb.init_timeout == 5.0


def test_demo_anchor_count_matches_the_bundled_corpus():
    """The demo asks for exactly the validation documents its target domain has (counted here from
    the raw corpus: floor(n * val_fraction) of a domain's n documents go to validation)."""
    from adapt_pretrain.data.demo import demo_corpus_paths

    config = yaml.safe_load(open(DEMO))
    (target,) = config["prepare"]["anchor_domains"]
    path = next(p for p in demo_corpus_paths() if os.path.basename(p).startswith(target))
    with gzip.open(path, "rt") as fh:
        texts = [json.loads(line)["text"] for line in fh if line.strip()]
    assert len(set(texts)) == len(texts)  # no duplicates, so the count below is exact
    available = math.floor(len(texts) * config["prepare"].get("val_fraction", 0.05))
    assert config["prepare"]["num_anchors"] == available == config["adapt"]["num_anchors"]


def test_demo_command_trains_and_reports_and_warns_about_missing_anchors(demo_data_dir, tmp_path):
    """`adapt-pretrain demo` (listed in --help) runs the demo config; asking for 50 anchors when the
    data holds 8 is said at start (the demo itself asks for what its data has)."""
    listed = run([PYTHON, "-m", "adapt_pretrain.cli", "--help"])
    assert "demo" in listed.stdout
    run_dir = tmp_path / "demo-run"
    proc = run([PYTHON, "-m", "adapt_pretrain.cli", "demo", "--processes", "1", *TINY_MODEL,
                f"data.data_dir={demo_data_dir}", "prepare.vocab_size=1024", f"train.run_dir={run_dir}",
                "train.steps=2", "optim.warmup_steps=1", "train.micro_batch_size=2", "train.global_batch_size=2",
                "train.progress_bar=false",
                "adapt.refresh_interval=1", "adapt.num_anchors=50", "wandb.enabled=false"], timeout=300)
    assert (run_dir / "report" / "index.html").exists() and (run_dir / "checkpoints").is_dir()
    assert "50 anchors asked for (adapt.num_anchors)" in proc.stderr and "holds only 8" in proc.stderr
    assert "ModuleNotFoundError" not in proc.stderr

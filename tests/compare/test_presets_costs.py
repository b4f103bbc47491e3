"""Presets produce the intended run configs; FLOPs per run charge each method's scoring work."""
import os

import pytest

from adapt_pretrain.config import AdaptConfig
from adapt_pretrain.experiments.methods.costs import ScoringWork, bm25_flops, run_flops
from adapt_pretrain.experiments.methods.plan import CompareConfig, plan_runs
from adapt_pretrain.experiments.methods.presets import PRESETS, get_preset
from adapt_pretrain.flops import ModelShape, forward_flops_per_token, training_flops

RUN = {"model": {"vocab_size": 64, "seq_len": 8, "hidden_size": 8, "num_layers": 1, "num_attention_heads": 2},
       "train": {"steps": 4, "micro_batch_size": 2}, "adapt": {"refresh_interval": 2}}


def _cfg(**kw):
    base = dict(out_dir="/tmp/out", prepare={}, run=RUN, seeds=[1, 2],
                static_mix={"weights": {"a": 1.0}}, method_overrides={"adapt": ["adapt.standardize=true"]})
    base.update(kw)
    return CompareConfig(**base)


@pytest.mark.parametrize("name,enabled,policy,signal", [
    ("uniform", False, "adapt", "embed"), ("adapt", True, "adapt", "embed"), ("adapt-std", True, "adapt", "embed"),
    ("adapt-bm25", True, "adapt", "bm25"),
    ("linupper", True, "linupper", "embed"), ("topk-embed", False, "adapt", "embed"),
    ("topk-bm25", False, "adapt", "embed"), ("static-mix", False, "adapt", "embed")])
def test_preset_adapt_section(name, enabled, policy, signal):
    specs = [s for s in plan_runs(_cfg()) if s.method == name]
    assert [s.seed for s in specs] == [1, 2]
    adapt = AdaptConfig.from_dict(specs[0].config["adapt"])
    assert (adapt.enabled, adapt.policy, adapt.signal) == (enabled, policy, signal)
    assert adapt.refresh_interval == 2  # shared settings survive
    # the adapt-std preset standardises; the config's per-method override applies to adapt only
    assert adapt.standardize is (name in ("adapt", "adapt-std"))
    assert ("adapt.standardize=true" in get_preset(name).overrides) is (name == "adapt-std")


def test_plan_dirs_seeds_and_data_variants():
    cfg = _cfg()
    specs = plan_runs(cfg)
    assert len(specs) == len(PRESETS) * 2
    assert [s.seed for s in specs[:len(PRESETS)]] == [1] * len(PRESETS)  # seeds outer
    by = {(s.method, s.seed): s for s in specs}
    assert by[("topk-bm25", 2)].data_dir == "/tmp/out/data-topk-bm25"
    assert by[("static-mix", 1)].data_dir == "/tmp/out/data-static-mix"
    assert by[("adapt", 1)].data_dir == "/tmp/out/data"
    s = by[("uniform", 2)]
    assert s.config["train"]["seed"] == 2 and s.config["train"]["run_dir"] == "/tmp/out/runs/uniform-s2"
    assert s.config["data"]["data_dir"] == "/tmp/out/data"
    assert s.config["train"]["steps"] == 4  # equal tokens: no method changes steps or batch
    assert len({x.fingerprint for x in specs}) == len(specs)
    # changing an offline method's setting invalidates only that method's runs
    other = {(x.method, x.seed): x.fingerprint for x in plan_runs(_cfg(selection={"fraction": 0.5}))}
    assert other[("topk-bm25", 1)] != by[("topk-bm25", 1)].fingerprint
    assert other[("uniform", 1)] == by[("uniform", 1)].fingerprint


def test_config_validation():
    with pytest.raises(ValueError):
        _cfg(methods=["nope"])
    with pytest.raises(ValueError):
        _cfg(static_mix={})
    with pytest.raises(ValueError):
        _cfg(run={**RUN, "train": {"seed": 3}})
    with pytest.raises(ValueError):
        get_preset("doremi")


TINY = ModelShape(vocab_size=10, seq_len=4, hidden_size=2, num_layers=1, num_attention_heads=1, ffn_hidden_size=8)
WORK = ScoringWork(candidate_tokens=1000, num_anchors=5, anchor_tokens=6, proxy_tokens=200, embed_tokens=300)


def test_run_flops_per_method_hand_count():
    train = 3 * 168 * 100  # see test_flops: forward 168 FLOPs per token
    f = {m: run_flops(get_preset(m), TINY, tokens=100, steps=10, groups=20, refresh_interval=4, work=WORK)
         for m in PRESETS}
    assert all(r.training == train for r in f.values())  # equal training compute
    assert f["uniform"].total == train and f["static-mix"].total == train
    assert f["adapt"].online_scoring == 2 * 2 * 100 + 2 * 2 * 20 and f["adapt"].anchor_refresh == 3 * 168 * 6
    assert f["adapt-std"].as_dict() == f["adapt"].as_dict()  # standardising costs nothing extra
    assert f["adapt-bm25"].prepare_scoring == 2 * 1000 * 5 == bm25_flops(1000, 5)
    assert f["topk-bm25"].prepare_scoring == 2 * 1000 * 5
    assert f["topk-embed"].prepare_scoring == 3 * 168 * 200 + 168 * 300
    assert f["linupper"].online_scoring == 2 * 100
    assert forward_flops_per_token(TINY) == 168 and training_flops(TINY, 1) == 504


def test_config_paths_relative_to_cwd_and_fingerprints_by_corpus_name(tmp_path, monkeypatch):
    import yaml

    from adapt_pretrain.config import ConfigError
    from adapt_pretrain.experiments.methods.plan import load_compare_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"out_dir": "out", "prepare": {"vocab_size": 300}, "run": RUN,
                                        "methods": ["uniform"], "seeds": [1], "eval": {"extra": ["x.jsonl"]}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--corpus"):
        load_compare_config(str(cfg_file))
    here = load_compare_config(str(cfg_file), corpus=["../beside/corpora"])
    assert here.prepare["inputs"] == [str(tmp_path.parent / "beside" / "corpora")]
    assert here.out_dir == str(tmp_path / "out") and here.eval_extra == [str(tmp_path / "x.jsonl")]
    moved = load_compare_config(str(cfg_file), corpus=["/elsewhere/corpora"])
    assert plan_runs(here)[0].fingerprint == plan_runs(moved)[0].fingerprint  # same corpus, another place
    other = load_compare_config(str(cfg_file), corpus=["/elsewhere/other_corpus"])
    assert plan_runs(here)[0].fingerprint != plan_runs(other)[0].fingerprint
    demo = load_compare_config(str(cfg_file), corpus=["demo"], overrides=("run.train.steps=7", "eval.docs=3"))
    assert all(os.path.isfile(p) for p in demo.prepare["inputs"]) and demo.run["train"]["steps"] == 7
    assert demo.eval_settings.docs == 3
    with pytest.raises(ConfigError, match="eval.docs"):
        load_compare_config(str(cfg_file), corpus=["demo"], overrides=("eval.docs=0",))


@pytest.mark.parametrize("name", ["compare-cpu.yaml", "compare-gpu.yaml"])
def test_shipped_configs_load_and_need_a_corpus(name, tmp_path):
    from adapt_pretrain.config import ConfigError
    from adapt_pretrain.experiments.methods.plan import load_compare_config

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch",
                        "configs", name)
    with open(path, encoding="utf-8") as fh:
        assert "shared/" not in fh.read()  # no machine's path in a shipped config
    with pytest.raises(ConfigError, match="--corpus DIR"):
        load_compare_config(path, out_dir=str(tmp_path))
    cfg = load_compare_config(path, out_dir=str(tmp_path), corpus=["demo"])
    assert cfg.prepare["inputs"] and len(plan_runs(cfg)) == len(cfg.methods) * len(cfg.seeds)

"""Config validation: a wrong value fails at construction with a message naming the field."""
from __future__ import annotations

import pytest

import os

from adapt_pretrain.config import ConfigError
from adapt_pretrain.data import (DataConfig, DataStream, PrepareConfig, anchor_batches, demo_corpus_paths,
                                 load_anchor_docs, prepare)


@pytest.mark.parametrize("change, field", [
    (dict(seq_len=0), "data.seq_len"),
    (dict(micro_batch_size=1.5), "data.micro_batch_size"),
    (dict(num_workers=-1), "data.num_workers"),
    (dict(mode="forever"), "data.mode"),
    (dict(finite_balance="even"), "data.finite_balance"),
    (dict(split="test"), "data.split"),
    (dict(strict="yes"), "data.strict"),
    (dict(worker_start_method="thread"), "data.worker_start_method"),
])
def test_data_config_rejects(prepared, change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        DataConfig(data_dir=prepared, **change)


def test_data_config_needs_a_prepared_dir_at_first_use(tmp_path):
    """Construction does no I/O (the directory may be created by `prepare` later); the stream and the
    anchor reader refuse a directory without manifest.json, naming the field."""
    missing = str(tmp_path / "not-prepared-yet")
    cfg = DataConfig(data_dir=missing)
    assert cfg.data_dir == missing and not os.path.exists(missing)
    for first_use in (lambda: DataStream(cfg, dp_rank=0, dp_size=1),
                      lambda: anchor_batches(missing, 16, 2, dp_rank=0, dp_size=1),
                      lambda: load_anchor_docs(missing)):
        with pytest.raises(ConfigError, match=r"data\.data_dir=.*not-prepared-yet.*no manifest\.json"):
            first_use()
    with pytest.raises(ConfigError, match="data.data_dir must be set"):
        DataConfig()


def test_construction_touches_no_file(monkeypatch):
    """Configs name paths that may not exist yet (another machine's inputs, a dir `prepare` creates)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"file-system access at construction: {args}")

    with monkeypatch.context() as m:
        for name in ("exists", "isfile", "isdir"):
            m.setattr(os.path, name, refuse)
        m.setattr(os, "stat", refuse)
        m.setattr("builtins.open", refuse)
        data = DataConfig(data_dir="/nonexistent/data")
        prep = PrepareConfig(inputs=["/nonexistent/x.jsonl"], out_dir="/nonexistent/out",
                             tokenizer="/nonexistent/tokenizer.json")
    assert data.data_dir == "/nonexistent/data" and prep.inputs == ["/nonexistent/x.jsonl"]


def test_data_parallel_coordinates_are_arguments_not_settings(prepared):
    with pytest.raises(ConfigError, match=r"data\.dp_rank is derived from the launcher's world size"):
        DataConfig.from_dict({"data_dir": prepared, "dp_rank": 0})
    with pytest.raises(TypeError):
        DataConfig(data_dir=prepared, dp_size=2)
    assert DataStream(DataConfig(data_dir=prepared), dp_rank=1, dp_size=2).rank == 1
    with pytest.raises(ConfigError, match=r"data-parallel rank 2 must be in \[0, 2\)"):
        DataStream(DataConfig(data_dir=prepared), dp_rank=2, dp_size=2)


def test_data_config_from_dict_rejects_unknown_keys(prepared):
    with pytest.raises(ConfigError, match=r"seq_length \(did you mean data\.seq_len\?\)"):
        DataConfig.from_dict({"data_dir": prepared, "seq_length": 128})
    assert DataConfig.from_dict({"data_dir": prepared, "seq_len": 128}).seq_len == 128


@pytest.mark.parametrize("change, field", [
    (dict(inputs=[]), "prepare.inputs"),
    (dict(out_dir=""), "prepare.out_dir"),
    (dict(vocab_size=100), "prepare.vocab_size"),
    (dict(val_fraction=1.0), "prepare.val_fraction"),
    (dict(shard_tokens=0), "prepare.shard_tokens"),
    (dict(num_workers=0), "prepare.num_workers"),
    (dict(bm25=True, num_anchors=0), "prepare.bm25"),
    (dict(anchor_domains=[]), "prepare.anchor_domains"),
])
def test_prepare_config_rejects(tmp_path, change, field):
    base = dict(inputs=demo_corpus_paths(), out_dir=str(tmp_path / "o"))
    base.update(change)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        PrepareConfig(**base)


@pytest.mark.parametrize("change, message", [
    (dict(inputs=["/nonexistent/x.jsonl"]), r"prepare\.inputs: path\(s\) do not exist: /nonexistent/x\.jsonl"),
    (dict(tokenizer="/nonexistent/tokenizer.json"), r"prepare\.tokenizer='/nonexistent/tokenizer\.json' is not a file"),
])
def test_prepare_paths_are_checked_when_prepare_runs(tmp_path, change, message):
    """A PrepareConfig naming paths that do not exist (yet) builds without touching the file system;
    `prepare()` refuses it before it writes anything, naming the field."""
    out = tmp_path / "o"
    cfg = PrepareConfig(**{"inputs": demo_corpus_paths(), "out_dir": str(out), **change})
    with pytest.raises(ConfigError, match=message):
        prepare(cfg)
    assert not out.exists()


def test_demo_corpus_is_small_and_complete():
    paths = demo_corpus_paths()
    assert len(paths) == 5 and sum(os.path.getsize(p) for p in paths) < 3_000_000
    assert os.path.isfile(os.path.join(os.path.dirname(paths[0]), "NOTICE"))

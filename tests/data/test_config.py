"""Config validation: a wrong value fails at construction with a message naming the field."""
from __future__ import annotations

import pytest

from adapt_pretrain.config import ConfigError
from adapt_pretrain.data import DataConfig, PrepareConfig, demo_corpus_paths


@pytest.mark.parametrize("change, field", [
    (dict(seq_len=0), "data.seq_len"),
    (dict(micro_batch_size=1.5), "data.micro_batch_size"),
    (dict(num_workers=-1), "data.num_workers"),
    (dict(mode="forever"), "data.mode"),
    (dict(finite_balance="even"), "data.finite_balance"),
    (dict(split="test"), "data.split"),
    (dict(strict="yes"), "data.strict"),
    (dict(dp_rank=2, dp_size=2), "data.dp_rank"),
    (dict(dp_size=0), "data.dp_size"),
    (dict(worker_start_method="thread"), "data.worker_start_method"),
])
def test_data_config_rejects(prepared, change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        DataConfig(data_dir=prepared, **change)


def test_data_config_needs_a_prepared_dir(tmp_path):
    with pytest.raises(ConfigError, match="no manifest.json"):
        DataConfig(data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data.data_dir must be set"):
        DataConfig()


def test_data_config_from_dict_rejects_unknown_keys(prepared):
    with pytest.raises(ConfigError, match="seq_length"):
        DataConfig.from_dict({"data_dir": prepared, "seq_length": 128})
    assert DataConfig.from_dict({"data_dir": prepared, "seq_len": 128}).seq_len == 128


@pytest.mark.parametrize("change, field", [
    (dict(inputs=[]), "prepare.inputs"),
    (dict(inputs=["/nonexistent/x.jsonl"]), "do not exist"),
    (dict(out_dir=""), "prepare.out_dir"),
    (dict(vocab_size=100), "prepare.vocab_size"),
    (dict(val_fraction=1.0), "prepare.val_fraction"),
    (dict(shard_tokens=0), "prepare.shard_tokens"),
    (dict(num_workers=0), "prepare.num_workers"),
    (dict(tokenizer="/nonexistent/tokenizer.json"), "prepare.tokenizer"),
    (dict(bm25=True, num_anchors=0), "prepare.bm25"),
    (dict(anchor_domains=[]), "prepare.anchor_domains"),
])
def test_prepare_config_rejects(tmp_path, change, field):
    base = dict(inputs=demo_corpus_paths(), out_dir=str(tmp_path / "o"))
    base.update(change)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        PrepareConfig(**base)


def test_demo_corpus_is_small_and_complete():
    import os
    paths = demo_corpus_paths()
    assert len(paths) == 5 and sum(os.path.getsize(p) for p in paths) < 3_000_000
    assert os.path.isfile(os.path.join(os.path.dirname(paths[0]), "NOTICE"))

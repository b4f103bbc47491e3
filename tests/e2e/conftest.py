"""Shared fixtures of the end-to-end tests: one prepared copy of the bundled demo corpus per session."""
from __future__ import annotations

import os

import pytest

TINY_MODEL = ["model.vocab_size=1024", "model.seq_len=32", "model.hidden_size=32", "model.num_layers=2",
              "model.num_attention_heads=4"]


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> str:
    """The demo corpus prepared with a small vocabulary (about 4 s, once per session)."""
    from adapt_pretrain.data.config import PrepareConfig
    from adapt_pretrain.data.demo import demo_corpus_paths
    from adapt_pretrain.data.prepare import prepare

    out = str(tmp_path_factory.mktemp("demo_data") / "data")
    prepare(PrepareConfig(inputs=demo_corpus_paths(), out_dir=out, vocab_size=1024, num_anchors=8,
                          progress=False, num_workers=1))
    assert os.path.exists(os.path.join(out, "manifest.json"))
    return out

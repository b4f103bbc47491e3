"""Shared fixtures of the DeepSpeed tests: the demo corpus prepared once per session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ds_data_dir(tmp_path_factory) -> str:
    """The bundled demo corpus with a 1024-token vocabulary, 8 anchors and BM25 scores (a few seconds)."""
    from adapt_pretrain.data.config import PrepareConfig
    from adapt_pretrain.data.demo import demo_corpus_paths
    from adapt_pretrain.data.prepare import prepare

    out = str(tmp_path_factory.mktemp("ds_data") / "data")
    prepare(PrepareConfig(inputs=demo_corpus_paths(), out_dir=out, vocab_size=1024, num_anchors=8, bm25=True,
                          progress=False, num_workers=1))
    return out

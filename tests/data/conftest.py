"""Shared fixtures: a small corpus cut from the bundled demo data, prepared once per session."""
from __future__ import annotations

import gzip
import json
import os

import pytest

from adapt_pretrain.data import PrepareConfig, demo_corpus_paths, prepare

DOCS_PER_DOMAIN = {"kjv_bible": 24, "jargon_file": 30, "fortunes_en": 120, "python_doc": 20, "python_code": 20}


def read_jsonl_gz(path: str) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> str:
    """Directory of DOMAIN.jsonl files holding the first docs of each demo domain."""
    d = tmp_path_factory.mktemp("corpus")
    for path in demo_corpus_paths():
        rows = read_jsonl_gz(path)
        dom = rows[0]["domain"]
        with open(os.path.join(d, f"{dom}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows[: DOCS_PER_DOMAIN[dom]]:
                f.write(json.dumps(r) + "\n")
    return str(d)


@pytest.fixture(scope="session")
def prepared(small_corpus, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("prepared")
    prepare(PrepareConfig(inputs=[small_corpus], out_dir=str(out), vocab_size=1024, shard_tokens=6000,
                          num_anchors=10, bm25=True, num_workers=2, progress=False, overwrite=True,
                          val_fraction=0.1))
    return str(out)

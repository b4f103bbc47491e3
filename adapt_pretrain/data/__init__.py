"""Data path of adapt-pretrain: prepare (raw text -> WebDataset shards + manifest + anchors) and a
streaming loader that packs documents into micro-batches with token groups and resumes exactly.

Trainer-facing API:
    DataConfig, DataStream(cfg)           iterate micro-batches; state_dict()/load_state_dict(); stats()
    anchor_batches(data_dir, seq_len, micro_batch_size, dp_rank, dp_size)
    domain_names(data_dir)                domain list (index = group_domain value)
    PrepareConfig, prepare(cfg)           build shards from raw corpora
    demo_corpus_paths()                   the bundled corpus
"""
from __future__ import annotations

from adapt_pretrain.data.anchors import anchor_batches, load_anchor_docs
from adapt_pretrain.data.config import DataConfig, DataError, PrepareConfig
from adapt_pretrain.data.demo import demo_corpus_paths
from adapt_pretrain.data.manifest import Manifest, check_counts, recount
from adapt_pretrain.data.prepare import prepare
from adapt_pretrain.data.stream import DataStream


def domain_names(data_dir: str) -> list[str]:
    """Domain names of a prepared directory; `group_domain` values index this list."""
    return Manifest.load(data_dir).domains


__all__ = ["DataConfig", "DataError", "PrepareConfig", "DataStream", "anchor_batches", "load_anchor_docs",
           "demo_corpus_paths", "domain_names", "prepare", "Manifest", "recount", "check_counts"]

"""Dataclass configs of the data path: `PrepareConfig` (raw text -> shards) and `DataConfig` (shards -> micro-batches).

Each field's rule is declared next to it (adapt_pretrain/config/base.py) and checked at construction,
so a wrong size fails at start-up with a message that names the field. Construction does no I/O:
the paths are checked where they are first used (`check_data_dir`, `check_prepare_inputs`), with
messages that name the field, so a config may name a data directory that `prepare` creates later.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from adapt_pretrain.config.base import (ConfigError, Section, choice, flag, integer, number, optional_integer, text,
                                        texts)
from adapt_pretrain.data.pieces import DEFAULT_MAX_CHARS

MODES = ("infinite", "finite")
FINITE_BALANCE = ("pad", "drop")
SPLITS = ("train", "val")
WORKER_START_METHODS = ("fork", "spawn", "forkserver")
MANIFEST = "manifest.json"


class DataError(RuntimeError):
    """Bad input met in strict mode, or an unusable data directory; the message names shard/file and key."""


def check_data_dir(data_dir: str, field_name: str = "data.data_dir") -> None:
    """ConfigError naming `field_name` unless `data_dir` holds a manifest.json written by `prepare`."""
    if not os.path.isfile(os.path.join(data_dir, MANIFEST)):
        raise ConfigError(f"{field_name}={data_dir!r} has no {MANIFEST}; run `adapt-pretrain prepare` first")


def check_prepare_inputs(cfg: "PrepareConfig") -> None:
    """ConfigError naming the field when an input path or the given tokenizer does not exist."""
    missing = [p for p in cfg.inputs if not os.path.exists(p)]
    if missing:
        raise ConfigError(f"prepare.inputs: path(s) do not exist: {', '.join(missing)}")
    if cfg.tokenizer is not None and not os.path.isfile(cfg.tokenizer):
        raise ConfigError(f"prepare.tokenizer={cfg.tokenizer!r} is not a file (expected a tokenizer.json)")


@dataclass
class PrepareConfig(Section):
    """Settings of `prepare` (raw corpora -> tokenizer, WebDataset shards, manifest, anchors).

    inputs: JSONL / JSONL.gz files, folders of them, or folders of plain-text files (one file = one
        document, domain = folder name).
    out_dir: output directory (created; must be empty unless overwrite=True).
    tokenizer: path to an existing tokenizer.json; None trains a byte-level BPE of `vocab_size` locally.
    val_fraction: share of each domain's documents that go to the validation split (deterministic).
    anchor_domains: target domains for the anchor set (None: every domain); num_anchors: how many
        validation documents become anchors (spread round-robin over the target domains).
    shard_tokens: close a shard once it holds this many tokens (shards are the unit of parallelism).
    num_workers: tokenising processes. bm25: store a z-scored BM25-to-anchors score per document.
    strict: raise on the first bad input line instead of skipping and counting it.
    drop_duplicates: drop documents whose text equals an earlier one's; by default they are counted
        and kept, each in the split of its first copy (never in both train and validation).
    max_piece_chars: texts longer than this are tokenised in pieces cut at word boundaries (same ids;
        bounds memory: one encode call holds at most this many characters; see pieces.py).
    """

    SECTION = "prepare"

    inputs: list[str] = texts(default_factory=list, non_empty=True,
                              hint="give at least one JSONL/JSONL.gz file or text folder")
    out_dir: str = text("", non_empty=True)
    tokenizer: Optional[str] = text(None, optional=True)
    vocab_size: int = integer(8192, minimum=260, maximum=1 << 31)
    eos_token: str = text("<|endoftext|>", non_empty=True)
    tokenizer_max_docs: Optional[int] = optional_integer(None, minimum=1)
    val_fraction: float = number(0.05, above=0, below=1)
    anchor_domains: Optional[list[str]] = texts(default=None, optional=True, non_empty=True, split_commas=True,
                                                hint="use None for every domain")
    num_anchors: int = integer(50, minimum=0)
    shard_tokens: int = integer(1 << 18, minimum=1)
    num_workers: int = integer(2, minimum=1)
    chunk_docs: int = integer(64, minimum=1)
    bm25: bool = flag(False)
    bm25_k1: float = number(1.2, minimum=0)
    bm25_b: float = number(0.75, minimum=0, maximum=1)
    strict: bool = flag(False)
    drop_duplicates: bool = flag(False)
    max_piece_chars: int = integer(DEFAULT_MAX_CHARS, minimum=1024)
    overwrite: bool = flag(False)
    progress: bool = flag(True)
    seed: int = integer(0, minimum=0)

    def check(self) -> None:
        if self.bm25 and self.num_anchors == 0:
            raise ConfigError("prepare.bm25 needs anchors: set num_anchors >= 1")


@dataclass
class DataConfig(Section):
    """Settings of the streaming loader (shards -> packed micro-batches, TEAM_CONTRACTS format).

    data_dir: a directory written by `prepare` (holds manifest.json; checked when the stream or the
        anchors are first read, `check_data_dir`). split: `train` or `val`.
    mode: `infinite` (endless; shards drawn epoch after epoch from fresh seeded permutations) or
        `finite` (one epoch per iteration; every rank yields the same number of micro-batches,
        short ranks padded with all-padding micro-batches (`finite_balance="pad"`) or long ranks cut
        (`"drop"`, counted in stats)).
    The data-parallel coordinates are not settings: `DataStream(cfg, dp_rank, dp_size)` takes them.
    num_workers: DataLoader worker processes (0 = in the calling process).
    strict: raise on bad input (corrupt tar, malformed sample, out-of-vocab id) instead of skip+count.
    shuffle_within_shard: permute documents inside a shard per epoch (seeded), on top of the
        seeded shard order. verify_checksums: compare each shard's sha256 with the manifest.
    worker_start_method: DataLoader worker start method; None = `fork` where available (spawned
        workers re-import torch: seconds per worker per epoch on small CPUs), else the default.
    """

    SECTION = "data"
    RUNTIME_KEYS = ("dp_rank", "dp_size")

    data_dir: str = text("", non_empty=True, hint="a directory written by `adapt-pretrain prepare`")
    split: str = choice("train", SPLITS)
    seq_len: int = integer(1024, minimum=1)
    micro_batch_size: int = integer(8, minimum=1)
    num_workers: int = integer(2, minimum=0)
    seed: int = integer(0, minimum=0)
    mode: str = choice("infinite", MODES)
    finite_balance: str = choice("pad", FINITE_BALANCE)
    strict: bool = flag(False)
    shuffle_within_shard: bool = flag(True)
    verify_checksums: bool = flag(True)
    prefetch_factor: int = integer(4, minimum=1)
    worker_start_method: Optional[str] = choice(None, WORKER_START_METHODS, optional=True)


__all__ = ["PrepareConfig", "DataConfig", "DataError", "ConfigError", "MODES", "FINITE_BALANCE", "check_data_dir",
           "check_prepare_inputs"]

"""Dataclass configs of the data path: `PrepareConfig` (raw text -> shards) and `DataConfig` (shards -> micro-batches).

Both validate at construction so a wrong path or size fails at start-up with a message that names
the field, not after an hour of tokenising or at the first training step.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from adapt_pretrain.config import ConfigError, dataclass_from_dict
from adapt_pretrain.data.pieces import DEFAULT_MAX_CHARS

MODES = ("infinite", "finite")
FINITE_BALANCE = ("pad", "drop")


class DataError(RuntimeError):
    """Bad input met in strict mode, or an unusable data directory; the message names shard/file and key."""


def _int(section: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{section}.{name}={value!r} must be an integer")
    if value < minimum:
        raise ConfigError(f"{section}.{name}={value} must be >= {minimum}")
    return value


def resolve_dp(rank: Optional[int], size: Optional[int]) -> tuple[int, int]:
    """Data-parallel (rank, size): given values win, else torch.distributed's, else (0, 1).

    With tensor/pipeline parallelism the global rank is not the data-parallel rank: pass both.
    """
    if rank is None or size is None:
        try:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                size = dist.get_world_size() if size is None else size
        except ImportError:  # pragma: no cover
            pass
    rank = 0 if rank is None else rank
    size = 1 if size is None else size
    if not 0 <= rank < size:
        raise ConfigError(f"data-parallel rank {rank} must be in [0, {size})")
    return rank, size


@dataclass
class PrepareConfig:
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

    inputs: list[str] = field(default_factory=list)
    out_dir: str = ""
    tokenizer: Optional[str] = None
    vocab_size: int = 8192
    eos_token: str = "<|endoftext|>"
    tokenizer_max_docs: Optional[int] = None
    val_fraction: float = 0.05
    anchor_domains: Optional[list[str]] = None
    num_anchors: int = 50
    shard_tokens: int = 1 << 18
    num_workers: int = 2
    chunk_docs: int = 64
    bm25: bool = False
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    strict: bool = False
    drop_duplicates: bool = False
    max_piece_chars: int = DEFAULT_MAX_CHARS
    overwrite: bool = False
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        s = "prepare"
        if isinstance(self.inputs, (str, os.PathLike)):
            self.inputs = [str(self.inputs)]
        self.inputs = [str(p) for p in self.inputs]
        if not self.inputs:
            raise ConfigError(f"{s}.inputs is empty: give at least one JSONL/JSONL.gz file or text folder")
        missing = [p for p in self.inputs if not os.path.exists(p)]
        if missing:
            raise ConfigError(f"{s}.inputs: path(s) do not exist: {', '.join(missing)}")
        if not self.out_dir:
            raise ConfigError(f"{s}.out_dir must be set")
        self.out_dir = str(self.out_dir)
        if self.tokenizer is not None:
            self.tokenizer = str(self.tokenizer)
            if not os.path.isfile(self.tokenizer):
                raise ConfigError(f"{s}.tokenizer={self.tokenizer!r} is not a file (expected a tokenizer.json)")
        _int(s, "vocab_size", self.vocab_size, 260)
        if self.vocab_size > 1 << 31:
            raise ConfigError(f"{s}.vocab_size={self.vocab_size} is too large")
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 < float(self.val_fraction) < 1.0):
            raise ConfigError(f"{s}.val_fraction={self.val_fraction!r} must be in (0, 1)")
        _int(s, "num_anchors", self.num_anchors, 0)
        _int(s, "shard_tokens", self.shard_tokens, 1)
        _int(s, "num_workers", self.num_workers, 1)
        _int(s, "chunk_docs", self.chunk_docs, 1)
        _int(s, "max_piece_chars", self.max_piece_chars, 1024)
        for name in ("bm25", "strict", "drop_duplicates", "overwrite", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{s}.{name}={getattr(self, name)!r} must be true or false")
        _int(s, "seed", self.seed, 0)
        if self.tokenizer_max_docs is not None:
            _int(s, "tokenizer_max_docs", self.tokenizer_max_docs, 1)
        if self.anchor_domains is not None:
            if isinstance(self.anchor_domains, str):
                self.anchor_domains = [d for d in self.anchor_domains.split(",") if d]
            if not self.anchor_domains:
                raise ConfigError(f"{s}.anchor_domains is empty; use None for every domain")
        if self.bm25 and self.num_anchors == 0:
            raise ConfigError(f"{s}.bm25 needs anchors: set num_anchors >= 1")
        for name in ("bm25_k1", "bm25_b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{s}.{name}={value!r} must be a finite number")
        if self.bm25_k1 < 0 or not 0.0 <= self.bm25_b <= 1.0:
            raise ConfigError(f"{s}.bm25_k1 must be >= 0 and bm25_b in [0, 1]")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PrepareConfig":
        return dataclass_from_dict(cls, values, section="prepare")


@dataclass
class DataConfig:
    """Settings of the streaming loader (shards -> packed micro-batches, TEAM_CONTRACTS format).

    data_dir: a directory written by `prepare` (holds manifest.json). split: `train` or `val`.
    mode: `infinite` (endless; shards drawn epoch after epoch from fresh seeded permutations) or
        `finite` (one epoch per iteration; every rank yields the same number of micro-batches,
        short ranks padded with all-padding micro-batches (`finite_balance="pad"`) or long ranks cut
        (`"drop"`, counted in stats)).
    dp_rank / dp_size: data-parallel coordinates; None reads torch.distributed (or 0 / 1).
    num_workers: DataLoader worker processes (0 = in the calling process).
    strict: raise on bad input (corrupt tar, malformed sample, out-of-vocab id) instead of skip+count.
    shuffle_within_shard: permute documents inside a shard per epoch (seeded), on top of the
        seeded shard order. verify_checksums: compare each shard's sha256 with the manifest.
    worker_start_method: DataLoader worker start method; None = `fork` where available (spawned
        workers re-import torch: seconds per worker per epoch on small CPUs), else the default.
    """

    data_dir: str = ""
    split: str = "train"
    seq_len: int = 1024
    micro_batch_size: int = 8
    num_workers: int = 2
    seed: int = 0
    mode: str = "infinite"
    finite_balance: str = "pad"
    strict: bool = False
    dp_rank: Optional[int] = None
    dp_size: Optional[int] = None
    shuffle_within_shard: bool = True
    verify_checksums: bool = True
    prefetch_factor: int = 4
    worker_start_method: Optional[str] = None

    def __post_init__(self) -> None:
        s = "data"
        if not self.data_dir:
            raise ConfigError(f"{s}.data_dir must be set to a directory written by `adapt-pretrain prepare`")
        self.data_dir = str(self.data_dir)
        if not os.path.isfile(os.path.join(self.data_dir, "manifest.json")):
            raise ConfigError(f"{s}.data_dir={self.data_dir!r} has no manifest.json; run `adapt-pretrain prepare` first")
        if self.split not in ("train", "val"):
            raise ConfigError(f"{s}.split={self.split!r} is invalid; choose one of train, val")
        _int(s, "seq_len", self.seq_len, 1)
        _int(s, "micro_batch_size", self.micro_batch_size, 1)
        _int(s, "num_workers", self.num_workers, 0)
        _int(s, "seed", self.seed, 0)
        _int(s, "prefetch_factor", self.prefetch_factor, 1)
        if self.mode not in MODES:
            raise ConfigError(f"{s}.mode={self.mode!r} is invalid; choose one of {', '.join(MODES)}")
        if self.finite_balance not in FINITE_BALANCE:
            raise ConfigError(f"{s}.finite_balance={self.finite_balance!r} is invalid; choose one of {', '.join(FINITE_BALANCE)}")
        for name in ("strict", "shuffle_within_shard", "verify_checksums"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{s}.{name}={getattr(self, name)!r} must be true or false")
        if self.worker_start_method not in (None, "fork", "spawn", "forkserver"):
            raise ConfigError(f"{s}.worker_start_method={self.worker_start_method!r} is invalid; "
                              "choose one of fork, spawn, forkserver (or leave unset)")
        if self.dp_size is not None:
            _int(s, "dp_size", self.dp_size, 1)
        if self.dp_rank is not None:
            _int(s, "dp_rank", self.dp_rank, 0)
            if self.dp_size is not None and self.dp_rank >= self.dp_size:
                raise ConfigError(f"{s}.dp_rank={self.dp_rank} must be < dp_size={self.dp_size}")

    def resolved_dp(self) -> tuple[int, int]:
        """(rank, size) from the config, else from torch.distributed when initialised, else (0, 1)."""
        return resolve_dp(self.dp_rank, self.dp_size)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DataConfig":
        return dataclass_from_dict(cls, values, section="data")


__all__ = ["PrepareConfig", "DataConfig", "DataError", "ConfigError", "MODES", "FINITE_BALANCE"]

"""Byte-level BPE tokenizer: trained locally with HF `tokenizers` or loaded from a tokenizer.json.

Nothing is downloaded. The tokenizer's identity in the manifest is the sha256 of its JSON
serialisation, so a loader can refuse shards made with a different tokenizer.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from adapt_pretrain.data.config import DataError


def train_bpe(texts: Iterable[str], vocab_size: int, eos_token: str) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE (every byte is in the alphabet: no unknown tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception subclass
        raise DataError(f"cannot load tokenizer {path!r}: {exc}") from exc


def eos_id(tok: Tokenizer, eos_token: str) -> int:
    tid = tok.token_to_id(eos_token)
    if tid is None:
        raise DataError(f"tokenizer has no end-of-document token {eos_token!r}; pass --eos-token with one it has")
    return int(tid)


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()

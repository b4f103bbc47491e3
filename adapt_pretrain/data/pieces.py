"""Long documents in pieces, so tokenising one huge document cannot take gigabytes.

HF `tokenizers` keeps per-token offsets, strings and per-byte alignments while it encodes: one
20 MB document took 3.5 GB to encode in one call and 2 GB to train a tokenizer on
(benchmarks/bench_prepare_memory.py). `prepare` therefore encodes (and trains on) long texts in
pieces of at most `max_chars` characters and concatenates the ids.

Where to cut: at a position p where text[p] is an ASCII space or newline ending a whitespace run
and text[p + 1] is a letter or digit. Byte-level BPE (GPT-2 pre-tokenisation, what `prepare`
trains) never merges across pre-tokens, and such a p starts a pre-token in the whole text as in the
piece (` word`, or `\\n` then `word`), while the piece before it ends on a pre-token boundary too (a
whitespace run `\\s+(?!\\S)` stops before its last character, a word before any whitespace). So the
ids of the pieces, concatenated, equal the ids of the whole text (tested on mixed scripts and
whitespace). A window of text without any such position (a very long token-like run, e.g. base64)
is cut at the window's end: a `hard` cut, counted, where ids may differ from one-piece encoding.
With another pre-tokenizer (`--tokenizer` given) the same cuts are used; they are word boundaries,
but exactness is only tested for byte-level BPE.
"""
from __future__ import annotations

from typing import Iterator

DEFAULT_MAX_CHARS = 1 << 18  # 256 Ki characters per encode call: ~40 MB of tokenizer memory


def last_cut(text: str, lo: int, hi: int) -> int | None:
    """The largest safe cut position p with lo < p <= hi (a space or newline followed by a letter or
    digit), or None."""
    p = min(hi, len(text) - 2)
    while p > lo:
        p = max(text.rfind(" ", lo + 1, p + 1), text.rfind("\n", lo + 1, p + 1))
        if p <= lo:
            return None
        if text[p + 1].isalnum():
            return p
        p -= 1
    return None


def split_text(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> tuple[list[str], int]:
    """(pieces of at most max_chars characters that concatenate to `text`, number of hard cuts)."""
    if len(text) <= max_chars:
        return [text], 0
    pieces: list[str] = []
    hard = 0
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = last_cut(text, start + max_chars // 2, end)
        if cut is None:
            cut, hard = end, hard + 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces, hard


def iter_pieces(texts: Iterator[str], max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[str]:
    """Every text, long ones as their pieces (for tokenizer training, which counts pre-tokens)."""
    for text in texts:
        yield from split_text(text, max_chars)[0]


__all__ = ["DEFAULT_MAX_CHARS", "split_text", "iter_pieces", "last_cut"]

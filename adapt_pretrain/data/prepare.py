"""`adapt-pretrain prepare`: raw corpora -> tokenizer, WebDataset shards, anchors, manifest.

Flow: (1) train a byte-level BPE on the training split (or load tokenizer.json); (2) read documents
(interleaved across inputs), tokenise chunks in a process pool, write train/val shards in order
(deterministic for any worker count), keep anchor candidates; (3) optionally score every document
with BM25 against the anchors and rewrite the shards with the z-scored score; (4) checksums and
manifest. Python API: `prepare(PrepareConfig(...)) -> manifest path`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from adapt_pretrain.config import ConfigError
from adapt_pretrain.data.bm25_pass import bm25_pass
from adapt_pretrain.data.config import DataError, PrepareConfig, check_prepare_inputs
from adapt_pretrain.data.demo import expand_demo_inputs
from adapt_pretrain.data.manifest import FORMAT, Manifest, shard_entry, split_summary, write_manifest
from adapt_pretrain.data.pieces import iter_pieces, split_text
from adapt_pretrain.data.readers import RawDoc, iter_documents
from adapt_pretrain.data.routing import DocumentRouter
from adapt_pretrain.data.shardio import ShardFile, SplitWriter, token_dtype
from adapt_pretrain.data.skips import SkipCounter
from adapt_pretrain.data.tokenizer import eos_id, load_tokenizer, tokenizer_hash, train_bpe
from adapt_pretrain.data.workers import die_with_parent
from adapt_pretrain.logs import setup_logging

log = logging.getLogger("adapt_pretrain.data")
OUR_FILES = ("manifest.json", "tokenizer.json", "anchors.tar", "train", "val")


# ---- tokenising worker processes -------------------------------------------------------------
_TOK: Any = None


def _init_worker(tok_path: str) -> None:
    global _TOK
    from tokenizers import Tokenizer
    _TOK = Tokenizer.from_file(tok_path)


def _init_pool_worker(tok_path: str, parent_pid: int) -> None:
    die_with_parent(parent_pid)  # a killed `prepare` must not leave its tokenising processes behind
    _init_worker(tok_path)


def _encode_chunk(args: tuple[list[str], str, int]) -> list[tuple[np.ndarray, int, int]]:
    """(token ids, pieces, hard cuts) of each text. Long texts are encoded in pieces and one encode
    call never holds more than `max_chars` characters, which bounds the tokenizer's memory."""
    texts, dtype, max_chars = args
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    batch: list[str] = []
    owners: list[int] = []

    def flush() -> None:
        for owner, enc in zip(owners, _TOK.encode_batch(batch, add_special_tokens=False)):
            parts[owner].append(np.asarray(enc.ids, dtype=dtype))
        batch.clear()
        owners.clear()

    stats = []
    size = 0
    for i, text in enumerate(texts):
        pieces, hard = split_text(text, max_chars)
        stats.append((len(pieces), hard))
        for piece in pieces:
            if batch and size + len(piece) > max_chars:
                flush()
                size = 0
            batch.append(piece)
            owners.append(i)
            size += len(piece)
    if batch:
        flush()
    return [(p[0] if len(p) == 1 else np.concatenate(p), n, hard) for p, (n, hard) in zip(parts, stats)]


def _chunks(docs: Iterator[Any], size: int) -> Iterator[list[Any]]:
    buf: list[Any] = []
    for d in docs:
        buf.append(d)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


class _Window:
    """At most `size` chunks between reading and writing: `pool.imap` reads its input as fast as it
    can, so without this a corpus read faster than it is tokenised would pile up in memory."""

    def __init__(self, size: int) -> None:
        self._slots = threading.Semaphore(size)
        self._closed = False

    def admit(self) -> bool:
        self._slots.acquire()
        return not self._closed

    def done(self) -> None:
        self._slots.release()

    def close(self) -> None:
        """Unblock the reader for good (on exit or error), so the pool can shut down."""
        self._closed = True
        self._slots.release(1 << 16)


# ---- main entry ---------------------------------------------------------------------------------
def _prepare_out_dir(cfg: PrepareConfig) -> None:
    if os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir):
        ours = [n for n in os.listdir(cfg.out_dir) if n in OUR_FILES]
        if not cfg.overwrite:
            raise DataError(f"output directory {cfg.out_dir!r} is not empty; pass overwrite=True / --overwrite")
        for n in ours:
            p = os.path.join(cfg.out_dir, n)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.makedirs(cfg.out_dir, exist_ok=True)


def _get_tokenizer(cfg: PrepareConfig) -> Any:
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    router = DocumentRouter(cfg.val_fraction, cfg.drop_duplicates)  # the same decisions as the main pass

    def train_texts() -> Iterator[str]:
        for doc in iter_documents(cfg.inputs, SkipCounter(strict=cfg.strict)):
            if router.route(doc) == "train":
                yield doc.text

    texts: Iterator[str] = train_texts()
    if cfg.tokenizer_max_docs:
        texts = (t for i, t in zip(range(cfg.tokenizer_max_docs), texts))
    log.info("training byte-level BPE (vocab %d)", cfg.vocab_size)
    return train_bpe(iter_pieces(texts, cfg.max_piece_chars), cfg.vocab_size, cfg.eos_token)


def prepare(cfg: PrepareConfig) -> str:
    """Run the whole preparation; returns the path of the written manifest.json."""
    cfg = dataclasses.replace(cfg, inputs=expand_demo_inputs(cfg.inputs))
    check_prepare_inputs(cfg)  # here, not at construction: a config may name inputs of another machine
    t0 = time.time()
    _prepare_out_dir(cfg)
    tok = _get_tokenizer(cfg)
    t_tok = time.time()
    log.info("tokenizer ready in %.1fs", t_tok - t0)
    tok_path = os.path.join(cfg.out_dir, "tokenizer.json")
    tok.save(tok_path)
    vocab = tok.get_vocab_size()
    eos = eos_id(tok, cfg.eos_token)
    dtype = token_dtype(vocab)

    skips = SkipCounter(strict=cfg.strict)
    router = DocumentRouter(cfg.val_fraction, cfg.drop_duplicates)
    writers = {s: SplitWriter(cfg.out_dir, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    anchor_pool: dict[str, list[tuple[int, np.ndarray, dict]]] = {}
    targets = set(cfg.anchor_domains) if cfg.anchor_domains else None
    df = np.zeros(vocab, dtype=np.int64) if cfg.bm25 else None
    num_docs = total_tokens = 0
    long_docs = {"documents": 0, "pieces": 0, "hard_cuts": 0, "piece_chars": cfg.max_piece_chars}

    routed = ((doc, split) for doc in iter_documents(cfg.inputs, skips) if (split := router.route(doc)) is not None)
    chunks = _chunks(routed, cfg.chunk_docs)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    pool = None
    if cfg.num_workers > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(cfg.num_workers, initializer=_init_pool_worker, initargs=(tok_path, os.getpid()))
    else:
        _init_worker(tok_path)
    # keep the chunk (documents + splits) next to its encoding: imap preserves order
    pending: list[list[tuple[RawDoc, str]]] = []
    window = _Window(2 * cfg.num_workers + 2)

    def feed() -> Iterator[tuple[list[str], str, int]]:
        for ch in chunks:
            if not window.admit():
                return
            pending.append(ch)
            yield [d.text for d, _ in ch], dtype, cfg.max_piece_chars

    results = pool.imap(_encode_chunk, feed(), chunksize=1) if pool else map(_encode_chunk, feed())
    bar = tqdm(desc="prepare: tokenising", unit="doc", disable=not cfg.progress, file=sys.stderr)
    try:
        for encoded in results:
            chunk = pending.pop(0)
            for (raw, split), (toks, n_pieces, hard_cuts) in zip(chunk, encoded):
                rec = {"domain": raw.domain, "source": raw.source}
                doc_id = num_docs
                writers[split].write(doc_id, toks, rec)
                num_docs += 1
                total_tokens += int(toks.size)
                if n_pieces > 1:
                    long_docs["documents"] += 1
                    long_docs["pieces"] += n_pieces
                    long_docs["hard_cuts"] += hard_cuts
                if df is not None:
                    df[np.unique(toks)] += 1
                if split == "val" and (targets is None or raw.domain in targets):
                    lst = anchor_pool.setdefault(raw.domain, [])
                    if len(lst) < cfg.num_anchors:
                        lst.append((doc_id, toks, rec))
            window.done()
            bar.update(len(chunk))
            bar.set_postfix(tokens=total_tokens)
    finally:
        bar.close()
        window.close()
        if pool:
            pool.close()
            pool.join()
    for w in writers.values():
        w.close()
    if long_docs["hard_cuts"]:
        log.warning("%d cut(s) inside %d long document(s) found no word boundary within %d characters; the ids at "
                    "those cuts may differ from encoding the document in one piece", long_docs["hard_cuts"],
                    long_docs["documents"], cfg.max_piece_chars)
    if router.duplicates:
        log.info("%d exact duplicate document(s) %s", router.duplicates,
                 "dropped" if cfg.drop_duplicates else "kept, each in the split of its first copy")
    if num_docs == 0:
        raise DataError(f"no usable documents in {cfg.inputs}; skipped: {skips.as_dict()}")

    # anchors: round-robin over target domains (sorted) so each target is represented
    domains = sorted({d for w in writers.values() for sf in w.done for d in sf.docs_per_domain})
    if targets is not None and not targets <= set(domains):
        raise DataError(f"anchor_domains {sorted(targets - set(domains))} not found; domains are {domains}")
    anchors: list[tuple[int, np.ndarray, dict]] = []
    queues = {d: list(anchor_pool.get(d, [])) for d in sorted(targets or domains)}
    while len(anchors) < cfg.num_anchors and any(queues.values()):
        for d in sorted(queues):
            if queues[d] and len(anchors) < cfg.num_anchors:
                anchors.append(queues[d].pop(0))
    if len(anchors) < cfg.num_anchors:
        log.warning("only %d validation documents available as anchors (asked for %d)", len(anchors), cfg.num_anchors)
    anchor_file = None
    if anchors:
        anchor_file = ShardFile(os.path.join(cfg.out_dir, "anchors.tar"), dtype)
        anchor_file.name = "anchors.tar"  # type: ignore[attr-defined]
        for doc_id, toks, rec in anchors:
            anchor_file.write(doc_id, toks, rec)
        anchor_file.close()

    all_files = [sf for w in writers.values() for sf in w.done] + ([anchor_file] if anchor_file else [])
    t_shards = time.time()
    log.info("tokenised and wrote shards in %.1fs", t_shards - t_tok)
    bm25_info: dict[str, Any] = {"enabled": False}
    if cfg.bm25:
        bm25_info = bm25_pass(cfg, all_files, df, num_docs, total_tokens, [a[1] for a in anchors], dtype, vocab, domains)

    raw = {
        "format": FORMAT,
        "tokenizer": {"file": "tokenizer.json", "sha256": tokenizer_hash(tok), "vocab_size": vocab,
                      "eos_id": eos, "eos_token": cfg.eos_token, "trained": cfg.tokenizer is None},
        "token_dtype": dtype,
        "domains": domains,
        "splits": {s: split_summary([shard_entry(cfg.out_dir, sf) for sf in w.done]) for s, w in writers.items()},
        "anchors": None if anchor_file is None else dict(
            shard_entry(cfg.out_dir, anchor_file), doc_ids=[a[0] for a in anchors],
            target_domains=sorted(targets or domains)),
        "bm25": bm25_info,
        "skipped": skips.as_dict(),
        "duplicates": {"documents": router.duplicates, "dropped": router.duplicates if cfg.drop_duplicates else 0},
        "long_documents": long_docs,
        "prepare": {"inputs": cfg.inputs, "val_fraction": cfg.val_fraction, "shard_tokens": cfg.shard_tokens,
                    "vocab_size": cfg.vocab_size, "seed": cfg.seed, "drop_duplicates": cfg.drop_duplicates, "seconds": round(time.time() - t0, 2),
                    "seconds_tokenizer": round(t_tok - t0, 2), "seconds_shards": round(t_shards - t_tok, 2)},
    }
    path = write_manifest(cfg.out_dir, raw)
    n_skip = sum(skips.as_dict().values())
    log.info("prepared %d docs, %d tokens in %.1fs; %d skipped %s", num_docs, total_tokens, time.time() - t0, n_skip,
             {k: v for k, v in skips.as_dict().items() if v})
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapt-pretrain prepare", description=__doc__.split("\n")[0])
    p.add_argument("--input", "-i", nargs="+", default=[], help="JSONL/JSONL.gz files, folders of them, or plain-text folders")
    p.add_argument("--demo", action="store_true", help="use the bundled demo corpus as input")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--tokenizer", help="existing tokenizer.json (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size of a newly trained tokenizer")
    p.add_argument("--eos-token", default="<|endoftext|>", help="end-of-document token appended after every document")
    p.add_argument("--tokenizer-max-docs", type=int, default=None, help="train the tokenizer on at most this many docs")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out as the val split")
    p.add_argument("--anchor-domains", default=None, help="comma-separated target domains (default: all)")
    p.add_argument("--num-anchors", type=int, default=50, help="validation documents of the target domains kept as anchors")
    p.add_argument("--shard-tokens", type=int, default=1 << 18, help="close a shard once it holds this many tokens")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="tokenising worker processes (default: CPU count, at most 8)")
    p.add_argument("--bm25", action="store_true", help="store a z-scored BM25-to-anchors score per document")
    p.add_argument("--strict", action="store_true", help="raise on the first bad input instead of skip+count")
    p.add_argument("--drop-duplicates", action="store_true",
                   help="drop exact duplicate documents (default: count them and keep each in its first copy's split)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and pipes)")
    p.add_argument("--verify", action="store_true", help="recount docs/tokens from the shards and compare")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    inputs = list(args.input)
    if args.demo:
        from adapt_pretrain.data.demo import demo_corpus_paths
        inputs += demo_corpus_paths()
    try:
        cfg = PrepareConfig(inputs=inputs, out_dir=args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                            eos_token=args.eos_token, tokenizer_max_docs=args.tokenizer_max_docs,
                            val_fraction=args.val_fraction, anchor_domains=args.anchor_domains,
                            num_anchors=args.num_anchors, shard_tokens=args.shard_tokens, num_workers=args.workers,
                            bm25=args.bm25, strict=args.strict, drop_duplicates=args.drop_duplicates,
                            overwrite=args.overwrite,
                            progress=not args.no_progress)
        t0 = time.time()
        path = prepare(cfg)
    except (ConfigError, DataError) as exc:
        print(f"adapt-pretrain prepare: {exc}", file=sys.stderr)
        return 2
    man = Manifest.load(cfg.out_dir)
    for split, v in man.raw["splits"].items():
        print(f"{split}: {len(v['shards'])} shards, {v['docs']} docs, {v['tokens']} tokens")
    print(f"manifest: {path} ({time.time() - t0:.1f}s)")
    if args.verify:
        from adapt_pretrain.data.manifest import check_counts
        problems = check_counts(cfg.out_dir)
        print("recount: OK, manifest counts match the shards" if not problems else "recount MISMATCH:\n" + "\n".join(problems))
        return 1 if problems else 0
    return 0

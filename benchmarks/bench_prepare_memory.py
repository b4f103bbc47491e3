"""`prepare` peak memory with one very long document: pieces on (the default) vs off.

Builds a JSONL input holding one document of `--doc-mb` MB (the bundled demo texts repeated) plus
the demo corpus, and runs the whole `prepare` (tokenizer training + tokenising, one process) twice
in fresh child processes: with `max_piece_chars` at its default and with it so large that every
text is encoded in one call (the behaviour before pieces). Prints peak RSS of each child and the
ratio, plus whether the two outputs hold the same token ids.
Usage: python benchmarks/bench_prepare_memory.py [--doc-mb 20]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time
from adapt_pretrain.data import PrepareConfig, prepare
inputs, out, piece_chars = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
prepare(PrepareConfig(inputs=inputs, out_dir=out, vocab_size=2048, num_anchors=4, num_workers=1,
                      progress=False, max_piece_chars=piece_chars))
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0}))
"""


def long_document(mb: int) -> str:
    from adapt_pretrain.data import demo_corpus_paths

    texts = [json.loads(line)["text"] for p in demo_corpus_paths() for line in gzip.open(p, "rt")]
    block = "\n\n".join(texts)
    size = mb * 1_000_000
    return (block * (size // len(block) + 1))[:size]


def run_child(inputs: list[str], out: str, piece_chars: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(inputs), out, str(piece_chars)],
                          capture_output=True, text=True, check=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def token_ids(out: str) -> list[bytes]:
    import tarfile

    ids = []
    for split in ("train", "val"):
        for name in sorted(os.listdir(os.path.join(out, split))):
            with tarfile.open(os.path.join(out, split, name)) as tf:
                ids += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".tokens")]
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--doc-mb", type=int, default=20, help="size of the one long document in MB")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from adapt_pretrain.data import demo_corpus_paths
    from adapt_pretrain.data.pieces import DEFAULT_MAX_CHARS

    with tempfile.TemporaryDirectory() as tmp:
        long_path = os.path.join(tmp, "long.jsonl")
        with open(long_path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"text": long_document(args.doc_mb), "domain": "long"}) + "\n")
        inputs = [long_path, *demo_corpus_paths()]
        t0 = time.time()
        pieces = run_child(inputs, os.path.join(tmp, "pieces"), DEFAULT_MAX_CHARS)
        whole = run_child(inputs, os.path.join(tmp, "whole"), 1 << 40)
        same = token_ids(os.path.join(tmp, "pieces")) == token_ids(os.path.join(tmp, "whole"))
    print(f"one {args.doc_mb} MB document + the demo corpus, 1 process, vocab 2048 ({time.time() - t0:.0f} s in all)")
    print(f"  pieces of {DEFAULT_MAX_CHARS} chars: peak RSS {pieces['peak_mb']:.0f} MB, {pieces['seconds']:.1f} s")
    print(f"  one call per text:      peak RSS {whole['peak_mb']:.0f} MB, {whole['seconds']:.1f} s")
    print(f"  memory ratio pieces / one call: {pieces['peak_mb'] / whole['peak_mb']:.3f}; same token ids: {same}")


if __name__ == "__main__":
    main()

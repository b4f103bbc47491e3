"""`adapt-pretrain eval`: per-domain held-out loss and perplexity of a trained run.

Held-out data: the validation split of a prepared data directory (default: the run's own) and any
extra JSONL / JSONL.gz sets (`{"text", "domain"}`; domain defaults to the file name), tokenised
with the run's tokenizer. Each domain's documents (each + EOS) are packed into seq_len windows,
exactly as training packs them, and the mean next-token loss over at most `--max-tokens` labels
(spread evenly over the domain's documents) is reported. Averages are unweighted means of
per-domain losses over the anchor ("seen") domains, the others ("unseen") and all, so a big domain
cannot hide a small one; their perplexity is exp(mean loss), the geometric mean of the domain
perplexities.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

DEFAULT_MAX_TOKENS = 32768
EVAL_VERSION = 2  # 2: the per-domain token budget is spread over all documents (1: first documents only)


def spread_prefixes(docs: Sequence[np.ndarray], budget: int | None) -> list[np.ndarray]:
    """Cut documents to a common prefix length so that together they hold about `budget` tokens.

    Why: a domain's first validation document can be unlike the rest (linux_doc's first one is a
    Chinese translation); taking the first `budget` tokens would make it the whole domain. The
    cap is the largest length c with sum(min(len, c)) <= budget (water-filling); shorter documents
    stay whole.
    """
    total = sum(len(d) for d in docs)
    if budget is None or total <= budget:
        return list(docs)
    remaining, lens = budget, sorted(len(d) for d in docs)
    cap = 1
    for i, length in enumerate(lens):
        share = remaining // (len(lens) - i)
        if length > share:
            cap = max(share, 1)
            break
        remaining -= length
    return [d[:cap] for d in docs]


def domain_averages(losses: Mapping[str, float], seen: Iterable[str]) -> dict[str, dict[str, float]]:
    """Unweighted mean loss (and exp of it) over seen, unseen and all domains; empty groups are omitted."""
    seen_set = set(seen)
    groups = {"seen": [d for d in losses if d in seen_set], "unseen": [d for d in losses if d not in seen_set],
              "all": list(losses)}
    out: dict[str, dict[str, float]] = {}
    for name, members in groups.items():
        if members:
            mean = float(np.mean([losses[d] for d in members]))
            out[name] = {"loss": mean, "ppl": math.exp(mean), "domains": len(members)}
    return out


def read_jsonl_texts(path: str) -> dict[str, list[str]]:
    """domain -> texts of a JSONL(.gz) file; records without a `domain` use the file's stem."""
    stem = os.path.basename(path).split(".")[0]
    out: dict[str, list[str]] = {}
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            obj = json.loads(line)
            text = obj.get("text")
            if isinstance(text, str) and text.strip():
                out.setdefault(str(obj.get("domain") or stem), []).append(text)
    return out


def held_out_sets(data_dir: str, extra: Sequence[str], tokenizer_path: str) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
    """domain -> token arrays for the validation split of `data_dir` plus each extra JSONL set."""
    from tokenizers import Tokenizer

    from adapt_pretrain.methods.derive import iter_train_records

    sets: dict[str, list[np.ndarray]] = {}
    source: dict[str, str] = {}
    for rec, toks in iter_train_records(data_dir, "val"):
        sets.setdefault(rec["domain"], []).append(toks.astype(np.int64))
        source[rec["domain"]] = "val"
    tok = Tokenizer.from_file(tokenizer_path) if extra else None
    for path in extra:
        for domain, texts in read_jsonl_texts(path).items():
            name = domain if domain not in sets else f"{os.path.basename(path).split('.')[0]}:{domain}"
            encs = tok.encode_batch(texts, add_special_tokens=False)
            sets[name] = [np.asarray(e.ids, dtype=np.int64) for e in encs]
            source[name] = os.path.abspath(path)
    return sets, source


def evaluate_run(run_dir: str, data_dir: str | None = None, extra: Sequence[str] = (), seen: Sequence[str] | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = True) -> dict[str, Any]:
    """Per-domain loss/perplexity and seen/unseen averages of the run's final checkpoint."""
    from tqdm import tqdm

    from adapt_pretrain.data.manifest import Manifest
    from adapt_pretrain.methods.modelpass import load_run_model, pack_windows, token_losses

    t0 = time.time()
    model = load_run_model(run_dir)
    data_dir = data_dir or model.data_dir
    man = Manifest.load(data_dir)
    if seen is None:
        seen = list((man.anchors() or {}).get("target_domains") or [])
    sets, source = held_out_sets(data_dir, extra, man.tokenizer_path)
    domains: dict[str, dict[str, Any]] = {}
    for name in tqdm(sorted(sets), desc=f"eval {os.path.basename(run_dir.rstrip('/'))}", disable=not progress):
        windows, mask = pack_windows(spread_prefixes(sets[name], max_tokens), man.eos_id, model.seq_len, max_tokens)
        losses = token_losses(model, windows)
        n = float(mask.sum())
        loss = float((losses * mask).sum() / max(n, 1.0))
        domains[name] = {"loss": loss, "ppl": math.exp(loss), "tokens": int(n), "source": source[name]}
    return {"run": os.path.abspath(run_dir), "step": model.step, "eval_version": EVAL_VERSION, "data_dir": os.path.abspath(data_dir),
            "seq_len": model.seq_len, "max_tokens_per_domain": max_tokens, "seen": sorted(seen),
            "domains": domains, "averages": domain_averages({d: v["loss"] for d, v in domains.items()}, seen),
            "seconds": round(time.time() - t0, 2)}


def format_result(result: Mapping[str, Any]) -> str:
    lines = [f"{'domain':<24} {'loss':>8} {'ppl':>10} {'tokens':>8}  seen"]
    for name, v in sorted(result["domains"].items()):
        lines.append(f"{name:<24} {v['loss']:8.4f} {v['ppl']:10.2f} {v['tokens']:8d}  {'*' if name in result['seen'] else ''}")
    for name, v in result["averages"].items():
        lines.append(f"{'avg(' + name + ')':<24} {v['loss']:8.4f} {v['ppl']:10.2f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapt-pretrain eval", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory (holds checkpoints/)")
    p.add_argument("--data", nargs="*", default=[],
                   help="a prepared data dir (its validation split; default: the run's) and/or extra JSONL(.gz) sets")
    p.add_argument("--seen", default=None, help="comma-separated seen domains (default: the anchor target domains)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="labels evaluated per domain at most")
    p.add_argument("--out", default=None, help="write the result JSON here (default: RUN/eval.json)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dirs = [d for d in args.data if os.path.isdir(d)]
    files = [f for f in args.data if not os.path.isdir(f)]
    missing = [f for f in files if not os.path.isfile(f)]
    if len(dirs) > 1 or missing:
        print(f"adapt-pretrain eval: give at most one data dir and existing JSONL files (bad: {dirs[1:] + missing})",
              file=sys.stderr)
        return 2
    try:
        result = evaluate_run(args.run, dirs[0] if dirs else None, files,
                              None if args.seen is None else [d for d in args.seen.split(",") if d],
                              args.max_tokens, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"adapt-pretrain eval: {exc}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run, "eval.json")
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1, sort_keys=True)
    os.replace(tmp, out)
    print(format_result(result))
    print(f"written {out} ({result['seconds']}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

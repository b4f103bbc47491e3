"""`adapt-pretrain eval`: per-domain held-out loss and perplexity of a trained run.

Held-out data: the validation split of a prepared data directory (default: the run's own) and any
extra JSONL / JSONL.gz sets (`{"text", "domain"}`; domain defaults to the file name), tokenised
with the run's tokenizer. Per domain, a seeded sample of `docs` documents is drawn (all of them when
there are fewer) and `max_tokens` labels are spread evenly over the sample: each document gives the
same number of labels (a document shorter than that share gives all of its own, the rest goes to
the longer ones), so neither one long document nor thousands of short ones decide a domain. Labels
are those training counts: every token of a document after its first, and the end-of-document
label only where the document really ends (a cut prefix gets none). The pieces are packed into
seq_len windows as training packs them. Averages are unweighted means of per-domain losses over
the anchor ("seen") domains, the others ("unseen") and all, so a big domain cannot hide a small
one; their perplexity is exp(mean loss), the geometric mean of the domain perplexities.
`compare` evaluates with the same settings (its config's `eval:` section, same defaults).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from adapt_pretrain.config.base import Section, integer, optional_integer

EVAL_VERSION = 3  # 3: seeded document sample, training's labels (2: budget over all docs, 1: first docs only)
DEFAULT_OUT = "eval.json"  # in the run dir; compare keeps its evaluations in COMPARE_RESULT, never here
# Run-dir files that `compare` owns (its cached result and the run's config); eval refuses to write
# them. Named here, where the refusal is, and imported by the experiment harness.
COMPARE_RESULT = "result.json"
COMPARE_RUN_CONFIG = "compare_run.yaml"
COMPARE_FILES = (COMPARE_RESULT, COMPARE_RUN_CONFIG)


@dataclass(frozen=True)
class EvalSettings(Section):
    """What is measured per domain; `eval` and `compare` share these defaults.

    max_tokens: labels evaluated per domain (fewer only when the sample holds fewer).
    docs: documents sampled per domain (every document when the domain has no more).
    doc_tokens: optional upper bound on the labels one document gives (None: the budget's even share).
    seed: sampling seed; the same seed gives every run the same documents.
    """

    SECTION = "eval"

    max_tokens: int = integer(32768, minimum=1)
    docs: int = integer(256, minimum=1)
    doc_tokens: int | None = optional_integer(None, minimum=1)
    seed: int = integer(0, minimum=0)


def sample_documents(count: int, k: int, seed: int, domain: str) -> np.ndarray:
    """Sorted indices of k of `count` documents (all when count <= k), drawn from a generator seeded
    by (seed, domain): each domain's sample is fixed by the seed alone, whatever other domains exist."""
    if count <= k:
        return np.arange(count)
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8"))])
    return np.sort(rng.choice(count, size=k, replace=False))


def label_counts(lengths: Sequence[int], budget: int, cap: int | None = None) -> list[int]:
    """Labels each document gives so that together they give `budget` (or all they have).

    A document of L tokens has L labels (tokens 2..L and its end label). Water-filling: the largest
    common share c with sum(min(L, c)) <= budget; documents shorter than c give all of theirs, and
    the few labels c leaves over go one each to the first documents still cut, so the total is
    exactly `budget` whenever the documents hold that many. `cap` bounds every document's count.
    """
    avail = [min(int(n), cap) if cap else int(n) for n in lengths]
    if sum(avail) <= budget:
        return avail
    remaining, share = budget, 0
    ordered = sorted(avail)
    for i, n in enumerate(ordered):
        share = remaining // (len(ordered) - i)
        if n > share:
            break
        remaining -= n
    counts = [min(n, share) for n in avail]
    left = budget - sum(counts)
    for i, n in enumerate(avail):
        if left == 0:
            break
        if counts[i] < n:
            counts[i] += 1
            left -= 1
    return counts


def label_stream(docs: Sequence[np.ndarray], counts: Sequence[int], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token stream of the cut documents (each followed by EOS, as training packs them) and a mask
    over its labels (mask[j] says whether stream[j + 1] is evaluated).

    A document giving k labels contributes its first k + 1 tokens when cut (labels: tokens 2..k+1;
    the EOS after it only separates it from the next document, its label is not counted) or all of
    its tokens and the end label when whole. The first token after an EOS is never a label: training
    does not count predicting a new document from the previous one either.
    """
    tokens: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for doc, k in zip(docs, counts):
        if k <= 0:
            continue
        whole = k >= len(doc)
        piece = np.asarray(doc if whole else doc[: k + 1], dtype=np.int64)
        tokens.append(np.append(piece, eos_id))
        mask = np.ones(len(piece) + 1, dtype=np.float32)
        mask[0] = 0.0                          # first token: predicted from another document
        if not whole:
            mask[-1] = 0.0                     # a cut prefix does not end here
        labels.append(mask)
    if not tokens:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    stream = np.concatenate(tokens)
    return stream, np.concatenate(labels)[1:]  # label j is stream[j + 1]


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


@dataclass
class HeldOut:
    """One domain's evaluation sample: the sampled documents' tokens and where they came from."""

    docs: list[np.ndarray]
    available: int  # documents of the domain before sampling
    source: str     # "val" (the data dir's validation split) or the JSONL file's path


def held_out_sets(data_dir: str, extra: Sequence[str], tokenizer_path: str, settings: EvalSettings) -> dict[str, HeldOut]:
    """domain -> sample of the validation split of `data_dir` and of each extra JSONL set (only the
    sampled texts of an extra set are tokenised)."""
    from tokenizers import Tokenizer

    from adapt_pretrain.data.manifest import iter_split_records

    val: dict[str, list[np.ndarray]] = {}
    for rec, toks in iter_split_records(data_dir, "val"):
        val.setdefault(rec["domain"], []).append(toks.astype(np.int64))
    sets = {name: HeldOut([docs[i] for i in sample_documents(len(docs), settings.docs, settings.seed, name)],
                          len(docs), "val") for name, docs in val.items()}
    tok = Tokenizer.from_file(tokenizer_path) if extra else None
    for path in extra:
        for domain, texts in read_jsonl_texts(path).items():
            name = domain if domain not in sets else f"{os.path.basename(path).split('.')[0]}:{domain}"
            chosen = [texts[i] for i in sample_documents(len(texts), settings.docs, settings.seed, name)]
            encs = tok.encode_batch(chosen, add_special_tokens=False)
            docs = [np.asarray(e.ids, dtype=np.int64) for e in encs]
            sets[name] = HeldOut([d for d in docs if len(d)], len(texts), os.path.abspath(path))
    return sets


def domain_loss(model: Any, held: HeldOut, eos_id: int, settings: EvalSettings) -> dict[str, Any]:
    """Mean next-token loss of one domain's sample, with the documents and labels it used."""
    from adapt_pretrain.trained_model import pack_windows, token_losses

    counts = label_counts([len(d) for d in held.docs], settings.max_tokens, settings.doc_tokens)
    stream, labels = label_stream(held.docs, counts, eos_id)
    windows, mask = pack_windows(stream, labels, model.seq_len, eos_id)
    losses = token_losses(model, windows)
    n = float(mask.sum())
    loss = float((losses * mask).sum() / max(n, 1.0))
    used = [k for k in counts if k > 0]
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(n), "docs": len(used),
            "docs_available": held.available, "whole_docs": sum(k == len(d) for k, d in zip(counts, held.docs) if k > 0),
            "max_doc_tokens": max(used, default=0), "source": held.source}


def evaluate_run(run_dir: str, data_dir: str | None = None, extra: Sequence[str] = (), seen: Sequence[str] | None = None,
                 settings: EvalSettings = EvalSettings(), progress: bool = True) -> dict[str, Any]:
    """Per-domain loss/perplexity and seen/unseen averages of the run's final checkpoint."""
    from tqdm import tqdm

    from adapt_pretrain.data.manifest import Manifest
    from adapt_pretrain.trained_model import load_run_model

    t0 = time.time()
    model = load_run_model(run_dir)
    data_dir = data_dir or model.data_dir
    man = Manifest.load(data_dir)
    if seen is None:
        seen = list((man.anchors() or {}).get("target_domains") or [])
    sets = held_out_sets(data_dir, extra, man.tokenizer_path, settings)
    domains: dict[str, dict[str, Any]] = {}
    for name in tqdm(sorted(sets), desc=f"eval {os.path.basename(run_dir.rstrip('/'))}", disable=not progress):
        domains[name] = domain_loss(model, sets[name], man.eos_id, settings)
        if domains[name]["tokens"] == 0:
            raise ValueError(f"held-out domain {name!r} ({sets[name].source}) has no evaluable tokens")
    return {"run": os.path.abspath(run_dir), "step": model.step, "eval_version": EVAL_VERSION, "data_dir": os.path.abspath(data_dir),
            "seq_len": model.seq_len, "settings": asdict(settings), "seen": sorted(seen),
            "domains": domains, "averages": domain_averages({d: v["loss"] for d, v in domains.items()}, seen),
            "seconds": round(time.time() - t0, 2)}


def format_result(result: Mapping[str, Any]) -> str:
    lines = [f"{'domain':<24} {'loss':>8} {'ppl':>10} {'tokens':>8} {'docs':>11}  seen"]
    for name, v in sorted(result["domains"].items()):
        docs = f"{v['docs']}/{v['docs_available']}"
        lines.append(f"{name:<24} {v['loss']:8.4f} {v['ppl']:10.2f} {v['tokens']:8d} {docs:>11}  "
                     f"{'*' if name in result['seen'] else ''}")
    for name, v in result["averages"].items():
        lines.append(f"{'avg(' + name + ')':<24} {v['loss']:8.4f} {v['ppl']:10.2f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = EvalSettings()
    p = argparse.ArgumentParser(prog="adapt-pretrain eval", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory (holds checkpoints/)")
    p.add_argument("--data", nargs="*", default=[],
                   help="a prepared data dir (its validation split; default: the run's) and/or extra JSONL(.gz) sets")
    p.add_argument("--seen", default=None, help="comma-separated seen domains (default: the anchor target domains)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"labels evaluated per domain (default {d.max_tokens})")
    p.add_argument("--docs", type=int, default=d.docs, help=f"documents sampled per domain (default {d.docs})")
    p.add_argument("--doc-tokens", type=int, default=d.doc_tokens,
                   help="at most this many labels per document (default: the budget's even share)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"document sampling seed (default {d.seed})")
    p.add_argument("--out", default=None, help=f"write the result JSON here (default: RUN/{DEFAULT_OUT})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is no terminal)")
    return p


def output_path(run_dir: str, out: str | None) -> str:
    """Where the result goes; refuses compare's per-run cache, which eval must never overwrite."""
    path = out or os.path.join(run_dir, DEFAULT_OUT)
    if os.path.basename(path) in COMPARE_FILES:
        raise ValueError(f"--out {path}: {os.path.basename(path)} is compare's own file; choose another name")
    return path


def main(argv: list[str] | None = None) -> int:
    from adapt_pretrain.megatron.parallel import PortInUseError

    args = build_parser().parse_args(argv)
    from adapt_pretrain.logs import quiet_known_warnings  # megatron's expected Apex/TE notices

    quiet_known_warnings()
    dirs = [d for d in args.data if os.path.isdir(d)]
    files = [f for f in args.data if not os.path.isdir(f)]
    missing = [f for f in files if not os.path.isfile(f)]
    if len(dirs) > 1 or missing:
        print(f"adapt-pretrain eval: give at most one data dir and existing JSONL files (bad: {dirs[1:] + missing})",
              file=sys.stderr)
        return 2
    try:
        out = output_path(args.run, args.out)
        settings = EvalSettings(args.max_tokens, args.docs, args.doc_tokens, args.seed)
        result = evaluate_run(args.run, dirs[0] if dirs else None, files,
                              None if args.seen is None else [d for d in args.seen.split(",") if d],
                              settings, progress=not args.no_progress and sys.stderr.isatty())
    except (FileNotFoundError, ValueError, PortInUseError) as exc:
        print(f"adapt-pretrain eval: {exc}", file=sys.stderr)
        return 2
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1, sort_keys=True)
    os.replace(tmp, out)
    print(format_result(result))
    print(f"written {out} ({result['seconds']}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

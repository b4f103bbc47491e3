"""The comparison's steps, in the order `compare` runs them: prepare the corpus once, check every
run's config, build the offline methods' data, train and evaluate each run (a few at a time),
re-evaluate finished runs whose eval settings changed, and cost and cache each result.

Progress notes go to the `adapt_pretrain` logger (stderr); each finished run's one-line result goes
to stdout, written whole, so concurrent jobs never glue lines together.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from adapt_pretrain.config import ConfigError
from adapt_pretrain.data.manifest import MANIFEST
from adapt_pretrain.experiments.methods import runs as R
from adapt_pretrain.experiments.methods.costs import ScoringWork, run_flops
from adapt_pretrain.experiments.methods.plan import CompareConfig, RunSpec, run_config, tokens_per_step
from adapt_pretrain.experiments.methods.presets import get_preset
from adapt_pretrain.experiments.methods.report import metrics_summary
from adapt_pretrain.logs import get_logger

log = get_logger(__name__)
_OUT_LOCK = threading.Lock()
_EVAL_LOCK = threading.Lock()  # evaluation runs in this process: one model and process group at a time


def print_result(line: str) -> None:
    """One result line on stdout, written whole (runs finish on several threads at once)."""
    with _OUT_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def ensure_data(cfg: CompareConfig) -> str:
    """Prepare the corpus into <out_dir>/data once (BM25 on: adapt-bm25 and topk-bm25 need it)."""
    from adapt_pretrain.data.config import PrepareConfig
    from adapt_pretrain.data.prepare import prepare

    if os.path.isfile(os.path.join(cfg.data_dir, MANIFEST)):
        return cfg.data_dir
    inputs = cfg.prepare.get("inputs") or []
    missing = [p for p in inputs if not os.path.exists(p)]
    if missing:
        raise ConfigError(f"corpus not found: {', '.join(missing)} (relative paths are taken from the current "
                          "directory); pass --corpus DIR, a folder of JSONL files per domain")
    log.info("preparing %d input(s) -> %s", len(inputs), cfg.data_dir)
    prepare(PrepareConfig(**{"progress": sys.stderr.isatty(), **cfg.prepare, "out_dir": cfg.data_dir, "bm25": True,
                             "overwrite": True}))
    return cfg.data_dir


def validate(cfg: CompareConfig, specs: list[RunSpec]) -> None:
    """Check every run's config now (derived data dirs may not exist yet: validate against the source)."""
    from adapt_pretrain.config import RunConfig

    for spec in specs:
        raw = copy.deepcopy(spec.config)
        raw["data"]["data_dir"] = cfg.data_dir
        try:
            RunConfig.from_dict(raw, source=f"{spec.method} seed {spec.seed}")
        except ConfigError as exc:
            raise ConfigError(f"run {spec.method} seed {spec.seed}: {exc}") from None


def ensure_variants(cfg: CompareConfig, env: dict[str, str]) -> ScoringWork:
    """Build the derived data dirs the chosen methods need; return the offline scoring sizes."""
    from adapt_pretrain.data.manifest import Manifest
    from adapt_pretrain.experiments.methods import offline

    man = Manifest.load(cfg.data_dir)
    anchors = man.anchors() or {}
    seq_len = int(cfg.run["model"]["seq_len"])
    num_anchors = min(int((cfg.run.get("adapt") or {}).get("num_anchors", 50)), len(anchors.get("doc_ids", [])))
    from adapt_pretrain.data.anchors import load_anchor_docs

    anchor_tokens = sum(min(len(d.tokens), seq_len) for d in load_anchor_docs(cfg.data_dir)[:num_anchors])
    work: dict[str, int] = {"candidate_tokens": int(man.raw["splits"]["train"]["tokens"]), "num_anchors": num_anchors,
                            "anchor_tokens": anchor_tokens}
    variants = {get_preset(m).data_variant for m in cfg.methods} - {None}
    if "topk-bm25" in variants:
        ids, scores, toks = offline.bm25_scores(cfg.data_dir)
        offline.build_topk(cfg.data_dir, cfg.variant_dir("topk-bm25"), ids, scores, toks, cfg.selection.fraction,
                           cfg.data_seed, {"method": "topk-bm25"})
    if "static-mix" in variants:
        offline.build_static_mix(cfg.data_dir, cfg.variant_dir("static-mix"), cfg.static_mix["weights"], cfg.data_seed)
    if "topk-embed" in variants:
        proxy = RunSpec("proxy-uniform", cfg.selection.proxy_seed, os.path.join(cfg.out_dir, "proxy"), cfg.data_dir,
                        run_config(cfg, get_preset("uniform"), cfg.selection.proxy_seed, cfg.data_dir,
                                   os.path.join(cfg.out_dir, "proxy"), (f"train.steps={cfg.selection.proxy_steps}",)))
        steps, per_step = tokens_per_step(proxy.config)
        work["proxy_tokens"] = steps * per_step
        scores_path = os.path.join(cfg.out_dir, "proxy", "embed_scores.json")
        if R.read_json(os.path.join(proxy.run_dir, "done.json")) != proxy.fingerprint or not os.path.exists(scores_path):
            log.info("top-k embed: training the proxy (%d uniform steps) and scoring documents", cfg.selection.proxy_steps)
            R.prepare_run_dir(proxy)
            R.run_logged(R.train_command(proxy), os.path.join(proxy.run_dir, "train.log"), env)
            R.run_logged([sys.executable, "-m", "adapt_pretrain.experiments.methods.offline", "--run", proxy.run_dir,
                          "--data", cfg.data_dir, "--num-anchors", str(num_anchors), "--out", scores_path,
                          "--no-progress", *(["--prefix", str(cfg.selection.embed_prefix)] if cfg.selection.embed_prefix else [])],
                         os.path.join(proxy.run_dir, "score.log"), env)
            R.write_json(os.path.join(proxy.run_dir, "done.json"), proxy.fingerprint)
        scored = R.read_json(scores_path)
        work["embed_tokens"] = int(scored["embed_tokens"])
        offline.build_topk(cfg.data_dir, cfg.variant_dir("topk-embed"), scored["doc_ids"], scored["scores"],
                           scored["tokens"], cfg.selection.fraction, cfg.data_seed, {"method": "topk-embed"})
    return ScoringWork(**work)


def evaluate_here(run_dir: str, cfg: CompareConfig) -> dict[str, Any]:
    """Evaluate a run in this process (saves a megatron import per run), one at a time; the 1-rank
    process group it opens (on a free port) is closed again before the next one."""
    from adapt_pretrain.evaluate import evaluate_run
    from adapt_pretrain.megatron.parallel import teardown_parallel

    with _EVAL_LOCK:
        try:
            return evaluate_run(run_dir, cfg.data_dir, cfg.eval_extra, None, cfg.eval_settings, progress=False)
        finally:
            teardown_parallel()


def execute(spec: RunSpec, cfg: CompareConfig, work: ScoringWork, env: dict[str, str]) -> dict[str, Any]:
    """Train (resuming if possible), evaluate and cost one run; returns and caches its result."""
    resumable = R.prepare_run_dir(spec)
    t0 = time.time()
    R.run_logged(R.train_command(spec), os.path.join(spec.run_dir, "train.log"), env)
    trained = (t0, time.time())
    evaluation = evaluate_here(spec.run_dir, cfg)
    return finish(spec, work, evaluation, trained, evaluation["seconds"], resumable, eval_key(cfg))


def eval_key(cfg: CompareConfig) -> str:
    """What a cached eval depends on besides the run: eval settings and the eval code's version."""
    from adapt_pretrain.evaluate import EVAL_VERSION

    blob = json.dumps({"eval": cfg.eval, "version": EVAL_VERSION, "data": cfg.data_dir}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def reevaluate(spec: RunSpec, cfg: CompareConfig, old: dict[str, Any]) -> dict[str, Any]:
    """Evaluate a finished run again (eval settings or code changed); training is not repeated."""
    evaluation = evaluate_here(spec.run_dir, cfg)
    result = {**old, "eval": evaluation, "eval_seconds": evaluation["seconds"], "eval_key": eval_key(cfg),
              **metrics_summary(spec.run_dir)}
    R.write_json(os.path.join(spec.run_dir, R.RESULT), result)
    return result


def finish(spec: RunSpec, work: ScoringWork, evaluation: dict[str, Any], trained: tuple[float, float], eval_s: float,
           resumable: bool, key: str) -> dict[str, Any]:
    """Cost the run and cache its result.json (written last: its presence marks a finished run).
    `trained`: wall-clock start and end of the training process (epoch seconds; runs overlap under --jobs)."""
    from adapt_pretrain.flops import ModelShape
    from adapt_pretrain.config import RunConfig

    rc = RunConfig.from_dict(spec.config)
    steps, per_step = tokens_per_step(spec.config)
    summary = metrics_summary(spec.run_dir)
    groups = int(summary["groups"]) or steps * rc.train.micro_batch_size  # at least one group per sequence
    flops = run_flops(get_preset(spec.method), ModelShape.from_model_config(rc.model), steps * per_step, steps, groups,
                      rc.adapt.refresh_interval, work)
    result = {"method": spec.method, "seed": spec.seed, "fingerprint": spec.fingerprint, "run_dir": spec.run_dir,
              "data_dir": spec.data_dir, "tokens": steps * per_step, "steps": steps, "flops": flops.as_dict(),
              "eval": evaluation, "train_seconds": round(trained[1] - trained[0], 1), "train_wall": list(trained),
              "eval_seconds": round(eval_s, 1),
              "resumed": resumable, "eval_key": key, **summary}
    R.write_json(os.path.join(spec.run_dir, R.RESULT), result)
    return result


def run_all(todo: list[RunSpec], cfg: CompareConfig, work: ScoringWork, env: dict[str, str], jobs: int) -> list[RunSpec]:
    """Train and evaluate `todo`, `jobs` at a time; one line per start and per end. Returns the failed runs."""
    failures: list[RunSpec] = []
    done = 0

    def one(spec: RunSpec) -> dict[str, Any]:
        log.info("start %s seed %s", spec.method, spec.seed)
        return execute(spec, cfg, work, env)

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    futures = {pool.submit(one, spec): (spec, time.time()) for spec in todo}
    try:
        for fut in as_completed(futures):
            spec, t = futures[fut]
            done += 1
            try:
                res = fut.result()
            except (RuntimeError, ValueError, OSError) as exc:  # one failed run must not lose the others
                failures.append(spec)
                log.error("[%d/%d] FAILED %s seed %s: %s", done, len(todo), spec.method, spec.seed, exc)
                continue
            avg, train_s = res["eval"]["averages"], max(res["train_seconds"], 1e-9)
            print_result(f"[{done}/{len(todo)}] {spec.method} seed {spec.seed}: seen {avg.get('seen', {}).get('loss', float('nan')):.4f} "
                f"unseen {avg.get('unseen', {}).get('loss', float('nan')):.4f} (train {train_s:.0f}s with start-up = "
                f"{res['tokens'] / train_s:,.0f} tokens/s, {res['flops']['training'] / train_s / 1e12:.3g} TFLOP/s; "
                f"eval {res['eval_seconds']:.0f}s; {time.time() - t:.0f}s since queued)")
    except KeyboardInterrupt:  # stop: queued runs must not start after the signal
        pool.shutdown(wait=False, cancel_futures=True)
        log.warning("interrupted after %d/%d runs", done, len(todo))
        raise
    pool.shutdown(wait=True)
    return failures

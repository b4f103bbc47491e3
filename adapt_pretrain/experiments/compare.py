"""`adapt-pretrain compare`: every method x seed at equal training tokens, evaluated, tabulated, plotted.

Flow: prepare the corpus once (with BM25 scores); build the offline methods' data (top-k subsets,
static mix; the embedding top-k trains and scores a short proxy run first); train each run as a
subprocess (`--jobs N` at a time); evaluate it on the held-out sets; cache `result.json` per run
dir; write the tables and plots. Interrupt it at any point and run the same command again:
finished runs are skipped, an unfinished one resumes from its last checkpoint, and the report
covers whatever is finished. The log is plain lines (one per event), fit for a file or a pipe.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Optional

from adapt_pretrain.config import ConfigError
from adapt_pretrain.data.config import DataError
from adapt_pretrain.experiments.methods import runs as R
from adapt_pretrain.experiments.methods.costs import ScoringWork, run_flops
from adapt_pretrain.experiments.methods.plan import CompareConfig, RunSpec, load_compare_config, plan_runs, run_config
from adapt_pretrain.experiments.methods.presets import get_preset

_LOG_LOCK = threading.Lock()
_EVAL_LOCK = threading.Lock()  # evaluation runs in this process: one model and process group at a time


def log(msg: str) -> None:
    """Status lines, each prefixed and written whole (concurrent jobs never glue lines together; a
    multi-line message, such as a failed run's log tail, stays greppable line by line)."""
    stamp = f"[compare {time.strftime('%H:%M:%S')}]"
    text = "".join(f"{stamp} {line}\n" for line in (msg.splitlines() or [""]))
    with _LOG_LOCK:
        sys.stdout.write(text)
        sys.stdout.flush()


def ensure_data(cfg: CompareConfig) -> str:
    """Prepare the corpus into <out_dir>/data once (BM25 on: adapt-bm25 and topk-bm25 need it)."""
    from adapt_pretrain.data.config import PrepareConfig
    from adapt_pretrain.data.prepare import prepare

    if os.path.isfile(os.path.join(cfg.data_dir, "manifest.json")):
        return cfg.data_dir
    inputs = cfg.prepare.get("inputs") or []
    missing = [p for p in inputs if not os.path.exists(p)]
    if missing:
        raise ConfigError(f"corpus not found: {', '.join(missing)} (relative paths are taken from the current "
                          "directory); pass --corpus PATH, e.g. --corpus ../shared/corpora from the repository root "
                          "of a development machine")
    log(f"preparing {len(inputs)} input(s) -> {cfg.data_dir}")
    prepare(PrepareConfig(**{"progress": sys.stderr.isatty(), **cfg.prepare, "out_dir": cfg.data_dir, "bm25": True,
                             "overwrite": True}))
    return cfg.data_dir


def _tokens_per_step(config: dict[str, Any]) -> tuple[int, int]:
    """(steps, tokens per step) of a raw run config, single data-parallel rank."""
    from adapt_pretrain.config import RunConfig
    from adapt_pretrain.layout import Layout

    rc = RunConfig.from_dict(config)
    layout = Layout.plan(rc.parallel, rc.train, rc.parallel.tensor * rc.parallel.pipeline)
    return rc.train.steps, layout.micro_batch_size * layout.num_microbatches * rc.model.seq_len * layout.dp


def validate(cfg: CompareConfig, specs: list[RunSpec]) -> None:
    """Check every run's config now (derived data dirs may not exist yet: validate against the source)."""
    import copy

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
        steps, per_step = _tokens_per_step(proxy.config)
        work["proxy_tokens"] = steps * per_step
        scores_path = os.path.join(cfg.out_dir, "proxy", "embed_scores.json")
        if R.read_json(os.path.join(proxy.run_dir, "done.json")) != proxy.fingerprint or not os.path.exists(scores_path):
            log(f"top-k embed: training the proxy ({cfg.selection.proxy_steps} uniform steps) and scoring documents")
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
    import hashlib
    import json

    from adapt_pretrain.evaluate import EVAL_VERSION

    blob = json.dumps({"eval": cfg.eval, "version": EVAL_VERSION, "data": cfg.data_dir}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def reevaluate(spec: RunSpec, cfg: CompareConfig, old: dict[str, Any]) -> dict[str, Any]:
    """Evaluate a finished run again (eval settings or code changed); training is not repeated."""
    evaluation = evaluate_here(spec.run_dir, cfg)
    result = {**old, "eval": evaluation, "eval_seconds": evaluation["seconds"], "eval_key": eval_key(cfg),
              **R.metrics_summary(spec.run_dir)}
    R.write_json(os.path.join(spec.run_dir, R.RESULT), result)
    return result


def finish(spec: RunSpec, work: ScoringWork, evaluation: dict[str, Any], trained: tuple[float, float], eval_s: float,
           resumable: bool, key: str) -> dict[str, Any]:
    """Cost the run and cache its result.json (written last: its presence marks a finished run).
    `trained`: wall-clock start and end of the training process (epoch seconds; runs overlap under --jobs)."""
    from adapt_pretrain.flops import ModelShape
    from adapt_pretrain.config import RunConfig

    rc = RunConfig.from_dict(spec.config)
    steps, per_step = _tokens_per_step(spec.config)
    summary = R.metrics_summary(spec.run_dir)
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


def estimate(cfg: CompareConfig, specs: list[RunSpec], todo: list[RunSpec], tflops: float) -> list[str]:
    """Size of the plan in the harness's FLOPs accounting: tokens, passes and training FLOPs per run,
    and the training time of all runs (and of those still to do) at `tflops` TFLOP/s."""
    from adapt_pretrain.data.manifest import Manifest
    from adapt_pretrain.flops import ModelShape, matmul_params, training_flops
    from adapt_pretrain.config import RunConfig

    full = int(Manifest.load(cfg.data_dir).raw["splits"]["train"]["tokens"])
    lines, flops_of = [], {}
    for spec in specs:
        raw = {**spec.config, "data": {**spec.config["data"], "data_dir": cfg.data_dir}}  # variants may not exist yet
        rc = RunConfig.from_dict(raw)
        steps, per_step = _tokens_per_step(raw)
        shape = ModelShape.from_model_config(rc.model)
        flops_of[spec.run_dir] = training_flops(shape, steps * per_step)
        if not lines:
            lines.append(f"model: {matmul_params(shape):,} matmul parameters (output layer included), "
                         f"{rc.model.vocab_size * rc.model.hidden_size:,} in the token embedding; "
                         f"training split: {full:,} tokens")
        if spec.seed == specs[0].seed:  # one line per method
            variant = get_preset(spec.method).data_variant
            data_tokens = full * (cfg.selection.fraction if variant and variant.startswith("topk-") else 1.0)
            lines.append(f"{spec.method}: {steps} steps x {per_step:,} tokens = {steps * per_step:,} tokens "
                         f"({steps * per_step / data_tokens:.1f} passes over its training data), "
                         f"{flops_of[spec.run_dir]:.3g} training FLOPs per run")
    total, rest = sum(flops_of.values()), sum(flops_of[s.run_dir] for s in todo)
    lines.append(f"all {len(specs)} runs: {total:.3g} training FLOPs = {total / (tflops * 1e12):.0f} s at {tflops:g} TFLOP/s "
                 f"({len(todo)} to do: {rest / (tflops * 1e12):.0f} s), not counting start-up, scoring and evaluation")
    return lines


def write_report(cfg: CompareConfig, specs: list[RunSpec], report: str, plots_dir: str) -> list[str]:
    from adapt_pretrain.experiments.methods.report import aggregate, markdown_tables, plot_all, update_marked_block

    results = [r for r in (R.cached_result(s) for s in specs) if r is not None]
    agg = aggregate(results)
    curves: dict[str, list] = {}
    weights: dict[str, dict] = {}
    for s in specs:
        if R.cached_result(s) is not None:
            curves.setdefault(s.method, []).append(R.loss_curve(s.run_dir))
            if s.method not in weights and s.config.get("adapt", {}).get("enabled"):
                weights[s.method] = R.weight_curves(s.run_dir)  # the first finished seed
    paths = plot_all(agg, cfg.methods, curves, plots_dir, weights=weights)
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(report)))  # noqa: E731
    done, total = len(results), len(specs)
    steps, per_step = _tokens_per_step(specs[0].config)
    block = (f"_Generated by `adapt-pretrain compare` from {done}/{total} finished runs "
             f"({len(cfg.methods)} methods x seeds {cfg.seeds}); every run trains {steps} steps x {per_step} tokens "
             f"= {steps * per_step:,} tokens._\n\n" + markdown_tables(agg, cfg.methods) + "\n"
             + "\n".join(f"![{os.path.basename(p)}]({rel(p)})" for p in paths) + "\n")
    update_marked_block(report, block + data_table(cfg, steps * per_step))
    return paths


def data_table(cfg: CompareConfig, budget: int) -> str:
    """Token share per domain of the full training split and of each derived one, and how often a
    run at `budget` tokens passes over each (top-k subsets repeat, the full data does not)."""
    from adapt_pretrain.data.manifest import Manifest

    dirs = {"full (uniform, adapt*, linupper)": cfg.data_dir}
    for m in cfg.methods:
        variant = get_preset(m).data_variant
        if variant and os.path.isfile(os.path.join(cfg.variant_dir(variant), "manifest.json")):
            dirs[variant] = cfg.variant_dir(variant)
    shares: dict[str, dict[str, float]] = {}
    passes: dict[str, float] = {}
    for name, path in dirs.items():
        man = Manifest.load(path)
        per = man.raw["splits"]["train"]["tokens_per_domain"]
        total = sum(per.values())
        shares[name] = {d: n / total for d, n in per.items()}
        passes[name] = budget / total
    domains = sorted({d for v in shares.values() for d in v})
    lines = ["", "Training data of each run (token share per domain, %; passes = training tokens / tokens in the set):", "",
             "| domain | " + " | ".join(dirs) + " |", "|---|" + "---|" * len(dirs)]
    for d in domains:
        lines.append(f"| {d} | " + " | ".join(f"{100 * shares[n].get(d, 0.0):.1f}" for n in dirs) + " |")
    lines.append("| passes | " + " | ".join(f"{passes[n]:.2f}" for n in dirs) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapt-pretrain compare", description=__doc__.split("\n")[0])
    p.add_argument("--config", "-c", required=True, help="comparison YAML (e.g. launch/configs/compare-cpu.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the config, e.g. run.train.steps=100 eval.max_tokens=4096")
    p.add_argument("--corpus", action="append", default=None,
                   help="a corpus file or folder (repeatable; replaces prepare.inputs; `demo` = the bundled corpus)")
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods (space or comma separated)")
    p.add_argument("--seeds", nargs="*", default=None, help="seeds (space or comma separated)")
    p.add_argument("--out-dir", default=None, help="override the config's out_dir")
    p.add_argument("--report", default=None, help="markdown file to write/update (default: OUT_DIR/results.md)")
    p.add_argument("--plots-dir", default=None, help="PNG folder (default: next to the report, results/)")
    p.add_argument("--jobs", "-j", type=int, default=1, help="runs trained at the same time (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of each training process (default: CPU cores / jobs when jobs > 1)")
    p.add_argument("--status", action="store_true", help="print which runs are finished and exit")
    p.add_argument("--estimate", type=float, default=None, metavar="TFLOPS",
                   help="prepare the data if needed, print tokens, passes, FLOPs and the training time at TFLOPS "
                        "TFLOP/s, and exit")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    return p


def _split(values: Optional[list[str]]) -> Optional[list[str]]:
    return None if not values else [v for item in values for v in item.split(",") if v]


def job_threads(jobs: int, threads: Optional[int]) -> Optional[int]:
    """Threads per training process: as asked, else an even split of the cores when several run at
    once (unless OMP_NUM_THREADS is set already), else the trainer's own choice."""
    if threads:
        return threads
    if jobs > 1 and not os.environ.get("OMP_NUM_THREADS"):
        return max(1, (os.cpu_count() or 1) // jobs)
    return None


def run_all(todo: list[RunSpec], cfg: CompareConfig, work: ScoringWork, env: dict[str, str], jobs: int) -> list[RunSpec]:
    """Train and evaluate `todo`, `jobs` at a time; one line per start and per end. Returns the failed runs."""
    failures: list[RunSpec] = []
    done = 0

    def one(spec: RunSpec) -> dict[str, Any]:
        log(f"start {spec.method} seed {spec.seed}")
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
                log(f"[{done}/{len(todo)}] FAILED {spec.method} seed {spec.seed}: {exc}")
                continue
            avg, train_s = res["eval"]["averages"], max(res["train_seconds"], 1e-9)
            log(f"[{done}/{len(todo)}] {spec.method} seed {spec.seed}: seen {avg.get('seen', {}).get('loss', float('nan')):.4f} "
                f"unseen {avg.get('unseen', {}).get('loss', float('nan')):.4f} (train {train_s:.0f}s with start-up = "
                f"{res['tokens'] / train_s:,.0f} tokens/s, {res['flops']['training'] / train_s / 1e12:.3g} TFLOP/s; "
                f"eval {res['eval_seconds']:.0f}s; {time.time() - t:.0f}s since queued)")
    except KeyboardInterrupt:  # stop: queued runs must not start after the signal
        pool.shutdown(wait=False, cancel_futures=True)
        log(f"interrupted after {done}/{len(todo)} runs")
        raise
    pool.shutdown(wait=True)
    return failures


LOCK_FILE = ".compare.lock"


def lock_out_dir(out_dir: str) -> Any:
    """An exclusive lock on the out_dir for this process's lifetime (the open file; the kernel drops it
    when the process ends, however it ends), or False when another compare holds it: two comparisons
    in one directory would prepare, train and report over each other."""
    import fcntl

    fh = open(os.path.join(out_dir, LOCK_FILE), "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return False
    return fh


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; KEY=VALUE items that --methods / --seeds swallowed are overrides."""
    args = build_parser().parse_args(argv)
    for name in ("methods", "seeds"):
        values = getattr(args, name) or []
        args.overrides += [v for v in values if "=" in v]
        setattr(args, name, [v for v in values if "=" not in v] or None)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return compare(parse_args(argv))
    except KeyboardInterrupt:  # Ctrl-C or a time limit: everything finished so far is kept
        log("interrupted: run the same command again to continue (finished runs are skipped)")
        return 130


def compare(args: argparse.Namespace) -> int:
    """The whole comparison for parsed arguments; returns the exit status."""
    from adapt_pretrain.logs import quiet_known_warnings  # megatron's expected Apex/TE notices

    quiet_known_warnings()
    try:
        if args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs} must be >= 1")
        seeds = _split(args.seeds)
        cfg = load_compare_config(args.config, _split(args.methods), [int(s) for s in seeds] if seeds else None,
                                  args.out_dir, args.corpus, tuple(args.overrides))
    except (ConfigError, ValueError, TypeError, OSError) as exc:
        print(f"adapt-pretrain compare: {exc}", file=sys.stderr)
        return 2
    report = args.report or os.path.join(cfg.out_dir, "results.md")
    plots_dir = args.plots_dir or os.path.join(os.path.dirname(os.path.abspath(report)), "results")
    os.makedirs(cfg.out_dir, exist_ok=True)
    lock = None if args.status else lock_out_dir(cfg.out_dir)
    if lock is False:
        print(f"adapt-pretrain compare: another compare is running in {cfg.out_dir} (it holds {LOCK_FILE}); "
              "wait for it or use another --out-dir", file=sys.stderr)
        return 2
    env = R.subprocess_env(job_threads(args.jobs, args.threads))
    t0 = time.time()
    specs = plan_runs(cfg)
    try:
        if not (args.status or args.report_only):
            ensure_data(cfg)
            validate(cfg, specs)
        elif args.estimate:
            raise ConfigError("--estimate cannot be combined with --status or --report-only")
    except (ConfigError, DataError) as exc:
        print(f"adapt-pretrain compare: {exc}", file=sys.stderr)
        return 2
    todo = R.pending(specs)
    key = eval_key(cfg)
    stale_eval = [s for s in specs if s not in todo and R.cached_result(s).get("eval_key") != key]
    log(f"{len(specs)} runs planned, {len(specs) - len(todo)} finished ({len(stale_eval)} to re-evaluate), "
        f"{len(todo)} to do")
    if args.estimate:
        for line in estimate(cfg, specs, todo, args.estimate):
            log(line)
        return 0
    if args.status:
        for s in specs:
            print(f"  {'done' if R.cached_result(s) else 'todo'}  {s.method:<11} seed {s.seed}  {s.run_dir}")
        return 0
    failures: list[RunSpec] = []
    if not args.report_only:
        for i, spec in enumerate(stale_eval, 1):
            reevaluate(spec, cfg, R.cached_result(spec))
            log(f"re-evaluated {i}/{len(stale_eval)}: {spec.method} seed {spec.seed}")
        if todo:
            work = ensure_variants(cfg, env)
            R.write_json(os.path.join(cfg.out_dir, "scoring_work.json"), work.__dict__)
            failures = run_all(todo, cfg, work, env, args.jobs)
    if not any(R.cached_result(s) for s in specs):
        log("no finished runs: no report")
        return 1 if failures else 0
    paths = write_report(cfg, specs, report, plots_dir)
    log(f"report {report}, plots {', '.join(paths)}; total {time.time() - t0:.0f}s")
    if failures:
        log(f"{len(failures)} run(s) failed: {', '.join(f'{s.method}-s{s.seed}' for s in failures)}; rerun to retry")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

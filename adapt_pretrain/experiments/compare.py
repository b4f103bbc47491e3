"""`adapt-pretrain compare`: every method x seed at equal training tokens, evaluated, tabulated, plotted.

Flow: prepare the corpus once (with BM25 scores); build the offline methods' data (top-k subsets,
static mix; the embedding top-k trains and scores a short proxy run first); train each run as a
subprocess (`--jobs N` at a time); evaluate it on the held-out sets; cache `result.json` per run
dir; write the tables and plots. Interrupt it at any point and run the same command again:
finished runs are skipped, an unfinished one resumes from its last checkpoint, and the report
covers whatever is finished. Progress notes go to stderr, one `[compare HH:MM:SS]` line per event;
results (each run's losses, the estimate, the status table) go to stdout: both fit a file or a pipe.
This module is the command (arguments, the out-dir lock, threads per job); the steps are in
`pipeline.py`, the tables and plots in `methods/report.py`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any, Optional

from adapt_pretrain.config import ConfigError
from adapt_pretrain.data.config import DataError
from adapt_pretrain.experiments import pipeline as P
from adapt_pretrain.experiments.methods import runs as R
from adapt_pretrain.experiments.methods.costs import estimate
from adapt_pretrain.experiments.methods.plan import RunSpec, load_compare_config, plan_runs
from adapt_pretrain.experiments.methods.report import write_report
from adapt_pretrain.logs import get_logger, log_level

HARNESS_LOGGER = "adapt_pretrain.experiments"
log = get_logger(f"{HARNESS_LOGGER}.compare")  # not __name__: that is __main__ under `python -m`


class EventFormatter(logging.Formatter):
    """`[compare HH:MM:SS] message`, the prefix on every line: a multi-line message (a failed run's
    log tail) stays greppable line by line."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = f"[compare {time.strftime('%H:%M:%S', time.localtime(record.created))}]"
        return "\n".join(f"{stamp} {line}" for line in (super().format(record).splitlines() or [""]))


def setup_event_log() -> None:
    """The harness's loggers write event lines to stderr (once per process; one handler writes a record whole)."""
    logger = logging.getLogger(HARNESS_LOGGER)
    if not any(isinstance(h.formatter, EventFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(EventFormatter())
        logger.addHandler(handler)
    logger.propagate = False  # the trainer's rank-prefixed format is for training processes
    logger.setLevel(log_level())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapt-pretrain compare", description=__doc__.split("\n")[0])
    p.add_argument("--config", "-c", required=True, help="comparison YAML (e.g. launch/configs/compare-cpu.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the config, e.g. run.train.steps=100 eval.max_tokens=4096")
    p.add_argument("--corpus", action="append", default=None,
                   help="the corpus: a folder of JSONL files, one per domain, or files (repeatable; required unless "
                        "the config sets prepare.inputs, which it replaces; `demo` = the corpus bundled with the package)")
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
    setup_event_log()
    try:
        return compare(parse_args(argv))
    except KeyboardInterrupt:  # Ctrl-C or a time limit: everything finished so far is kept
        log.warning("interrupted: run the same command again to continue (finished runs are skipped)")
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
            P.ensure_data(cfg)
            P.validate(cfg, specs)
        elif args.estimate:
            raise ConfigError("--estimate cannot be combined with --status or --report-only")
    except (ConfigError, DataError) as exc:
        print(f"adapt-pretrain compare: {exc}", file=sys.stderr)
        return 2
    todo = R.pending(specs)
    key = P.eval_key(cfg)
    stale_eval = [s for s in specs if s not in todo and R.cached_result(s).get("eval_key") != key]
    log.info("%d runs planned, %d finished (%d to re-evaluate), %d to do", len(specs), len(specs) - len(todo),
             len(stale_eval), len(todo))
    if args.estimate:
        for line in estimate(cfg, specs, todo, args.estimate):
            print(line)
        return 0
    if args.status:
        for s in specs:
            print(f"  {'done' if R.cached_result(s) else 'todo'}  {s.method:<11} seed {s.seed}  {s.run_dir}")
        return 0
    failures: list[RunSpec] = []
    if not args.report_only:
        for i, spec in enumerate(stale_eval, 1):
            P.reevaluate(spec, cfg, R.cached_result(spec))
            log.info("re-evaluated %d/%d: %s seed %s", i, len(stale_eval), spec.method, spec.seed)
        if todo:
            work = P.ensure_variants(cfg, env)
            R.write_json(os.path.join(cfg.out_dir, "scoring_work.json"), work.__dict__)
            failures = P.run_all(todo, cfg, work, env, args.jobs)
    if not any(R.cached_result(s) for s in specs):
        log.warning("no finished runs: no report")
        return 1 if failures else 0
    paths = write_report(cfg, specs, report, plots_dir)
    print(f"report {report}, plots {', '.join(paths)}; total {time.time() - t0:.0f}s")
    if failures:
        log.error("%d run(s) failed: %s; rerun to retry", len(failures), ", ".join(f"{s.method}-s{s.seed}" for s in failures))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

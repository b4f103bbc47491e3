"""`adapt-pretrain train` / `python -m adapt_pretrain.train`: the command.

Parses the command line, loads the config, refuses a fresh start over existing checkpoints in the
first seconds, starts the process group and the watchdog, runs a `Trainer` (adapt_pretrain/training/)
and turns its outcome into an exit code and a console message naming the rank. The loop, its
callbacks, construction and resume live in `adapt_pretrain.training`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch.distributed as dist

from adapt_pretrain import watchdog
from adapt_pretrain.checkpointing import CheckpointError
from adapt_pretrain.config import ConfigError
from adapt_pretrain.data.config import DataError
from adapt_pretrain.deepspeed.launcher import configure_threads, init_distributed, read_dist_env, strip_local_rank
from adapt_pretrain.logs import quiet_known_warnings, setup_logging
from adapt_pretrain.config import RunConfig, load_run_config
from adapt_pretrain.layout import Layout
from adapt_pretrain.training.callbacks.nonfinite import NonFiniteLossError
from adapt_pretrain.training.resume import fresh_start_problem
from adapt_pretrain.training.trainer import Trainer

# Exit codes of `adapt-pretrain train` (docs/TRAINING.md, "Exit codes"); 124 (a hang) is the watchdog's.
EXIT_OK, EXIT_UNEXPECTED, EXIT_CONFIG, EXIT_CHECKPOINT, EXIT_NONFINITE, EXIT_DATA = 0, 1, 2, 3, 4, 5


# ----- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adapt-pretrain train",
        description="Pretrain a megatron-core GPT with optional ADAPT reweighting (adapt.enabled=true).",
        epilog="Overrides: section.key=value, e.g. train.steps=20 adapt.enabled=false parallel.pipeline=2. "
               "Launch with `deepspeed --num_gpus N --module adapt_pretrain.train --config FILE`, torchrun, "
               "or as one process. See docs/TRAINING.md.")
    p.add_argument("--config", "-c", help="YAML file, or DeepSpeed-style JSON with an \"adapt\" section")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the newest checkpoint in <run_dir>/checkpoints that verifies (or from the "
                        "given checkpoint directory); step 0 if the run dir has no checkpoints yet")
    p.add_argument("--allow-change", action="append", default=[], metavar="FIELD[,FIELD...]",
                   help="on resume, let these optim.* fields differ from the checkpoint (e.g. optim.lr,optim.min_lr "
                        "after a non-finite stop, or optim.total_steps to re-plan the LR schedule); each change "
                        "is printed and logged as a resume_override event")
    p.add_argument("--restart-from-scratch", action="store_true",
                   help="start at step 0 although the run dir holds checkpoints; they are moved to "
                        "checkpoints/superseded_<time>/, never deleted")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


# ----- entry ----------------------------------------------------------------------------------------

def _allowed_changes(args: argparse.Namespace, cfg: RunConfig) -> tuple[str, ...]:
    """The fields of `--allow-change` (comma lists, repeatable), checked against the config."""
    from adapt_pretrain.checkpointing import consent_problems

    fields = tuple(f.strip() for group in args.allow_change for f in group.split(",") if f.strip())
    if fields and args.resume is None:
        raise ConfigError("--allow-change only applies to a resume (add --resume)")
    bad = consent_problems(fields)
    if bad:
        raise ConfigError(f"--allow-change {', '.join(bad)}: only optim.* fields may change on resume with consent "
                          "(other changes alter what the saved state means; start a new run_dir for those)")
    known = set(dataclasses.asdict(cfg.optim))
    unknown = [f for f in fields if f.rstrip("*").rstrip(".") != "optim" and f.split(".", 1)[1] not in known]
    if unknown:
        raise ConfigError(f"--allow-change {', '.join(unknown)}: unknown field(s); optim has {', '.join(sorted(known))}")
    return fields


def _report(exc: BaseException, rank: int, unexpected: bool = False) -> None:
    """Print a failure on the console with its rank. Verdicts every rank reached alike print once (rank 0)."""
    if not unexpected and getattr(exc, "same_on_every_rank", isinstance(exc, ConfigError)) and rank != 0:
        return
    if unexpected:
        import traceback

        lines = traceback.format_exception(exc)
        text = f"unexpected {type(exc).__name__}: {exc}\n" + "".join(f"[rank {rank}] {line}" for chunk in lines
                                                                      for line in chunk.splitlines(keepends=True))
    else:
        text = str(exc)
    print(f"adapt-pretrain train (rank {rank}): {text}", file=sys.stderr, flush=True)


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, CheckpointError):
        return EXIT_CHECKPOINT
    if isinstance(exc, NonFiniteLossError):
        return EXIT_NONFINITE
    if isinstance(exc, DataError):
        return EXIT_DATA
    return EXIT_UNEXPECTED


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_warnings()
    argv, local_rank = strip_local_rank(argv)  # deepspeed appends --local_rank=N
    args = build_parser().parse_intermixed_args(argv)  # overrides may follow options (e.g. appended ones)
    if args.resume not in (None, "auto") and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.insert(0, args.resume)  # `--resume train.steps=9`: an override, not a path
        args.resume = "auto"
    env = read_dist_env(local_rank)
    configure_threads(env)
    setup_logging(env.rank)
    try:
        cfg = load_run_config(args.config, args.overrides)
        Layout.plan(cfg.parallel, cfg.train, env.world_size)
        allow_change = _allowed_changes(args, cfg)
    except ConfigError as exc:
        if env.rank == 0:
            print(f"adapt-pretrain train: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        if env.rank == 0:
            print(json.dumps(cfg.to_dict(), indent=2, default=str))
        return EXIT_OK
    problem = None if args.resume or args.restart_from_scratch else fresh_start_problem(cfg.train.run_dir)
    if problem:  # refused in the first seconds, before the process group and megatron exist
        if env.rank == 0:
            print(f"adapt-pretrain train (rank 0): {problem}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT
    init_distributed(env, timeout_s=cfg.train.process_group_timeout_s())
    if cfg.train.watchdog:
        watchdog.install(env.rank, env.world_size, cfg.train.collective_timeout_s, env.master_addr, env.master_port)
    trainer = None
    try:
        trainer = Trainer(cfg, env, resume=args.resume, allow_change=allow_change, restart=args.restart_from_scratch)
        t0 = time.perf_counter()
        result = trainer.run()
        if trainer.info.is_logging_rank:
            print(f"[adapt-pretrain] done: {result.steps_run} steps in {time.perf_counter() - t0:.1f}s, "
                  f"final loss {result.losses[-1] if result.losses else float('nan'):.4f}, run dir {cfg.train.run_dir}",
                  flush=True)
        return EXIT_OK
    except (ConfigError, CheckpointError, NonFiniteLossError, DataError) as exc:
        _report(exc, env.rank)
        return _exit_code(exc)
    except Exception as exc:  # a bug or an environment failure: every rank shows its own, with its rank
        _report(exc, env.rank, unexpected=True)
        return EXIT_UNEXPECTED
    finally:
        if trainer is not None:
            trainer.close()
        from adapt_pretrain.megatron import teardown_parallel

        teardown_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        watchdog.uninstall()


if __name__ == "__main__":
    raise SystemExit(main())

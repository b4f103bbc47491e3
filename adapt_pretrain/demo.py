"""`adapt-pretrain demo`: the README's demo from the command line (what `bash launch/demo.sh` runs after installing).

Pretrains the small demo GPT on the bundled corpus with ADAPT on (launch/configs/demo-cpu.yaml),
as `--processes` processes started by the deepspeed launcher (1: one plain process), continuing
the run in its run directory if it has checkpoints, then renders the curriculum report. Extra
`section.key=value` arguments override the config (e.g. train.steps=50).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "launch", "configs", "demo-cpu.yaml")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapt-pretrain demo", description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2, help="training processes (deepspeed launcher; 1: plain)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo config")
    return p


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(processes: int, overrides: list[str]) -> int:
    """Run the demo training; returns the trainer's exit code."""
    args = ["--config", DEMO_CONFIG, *overrides, "--resume"]  # --resume last: it takes an optional value
    if processes == 1:
        from adapt_pretrain.train import main as train_main

        return train_main(args)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return subprocess.call([deepspeed, "--num_gpus", str(processes), "--master_port", str(_free_port()),
                            "--module", "adapt_pretrain.train", *args])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.processes < 1:
        print("adapt-pretrain demo: --processes must be >= 1", file=sys.stderr)
        return 2
    if not os.path.isfile(DEMO_CONFIG):
        print(f"adapt-pretrain demo: the demo config {DEMO_CONFIG} is missing; it ships with the source "
              "repository (run from a clone, or use `adapt-pretrain train --config FILE`)", file=sys.stderr)
        return 2
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    code = train(args.processes, list(args.overrides))
    if code != 0:
        return code
    from adapt_pretrain.monitor.report import main as report_main
    from adapt_pretrain.config import load_run_config

    return int(report_main([load_run_config(DEMO_CONFIG, list(args.overrides)).train.run_dir]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

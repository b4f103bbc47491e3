"""`adapt-pretrain` command line: one subcommand per job, each living in its own module.

Subcommands are resolved lazily so `adapt-pretrain report` does not import megatron or deepspeed.
Each target module exposes `main(argv: list[str]) -> int` and `build_parser()`.
"""
from __future__ import annotations

import importlib
import sys

from adapt_pretrain.logs import setup_logging

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("adapt_pretrain.data.prepare", "tokenise corpora into WebDataset shards + manifest + anchors"),
    "train": ("adapt_pretrain.train", "pretrain a megatron-core GPT with optional ADAPT reweighting"),
    "report": ("adapt_pretrain.monitor.report", "render PNG plots and an HTML page from a run directory"),
    "eval": ("adapt_pretrain.evaluate", "per-domain held-out loss and perplexity of a trained run"),
    "export": ("adapt_pretrain.export", "a run's checkpoint as a Hugging Face LlamaForCausalLM (safetensors)"),
    "compare": ("adapt_pretrain.experiments.compare", "equal-FLOPs comparison of reweighting methods over seeds"),
    "demo": ("adapt_pretrain.demo", "train the demo GPT on the bundled corpus (ADAPT on), then render its report"),
}


def _usage() -> str:
    lines = ["usage: adapt-pretrain [--version] <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from adapt_pretrain import __version__
        print(f"adapt-pretrain {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"adapt-pretrain: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    setup_logging()
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

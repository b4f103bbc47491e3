"""The command line explains itself: `--version` from setup.py, help text on every flag of every
subcommand, every `python -m adapt_pretrain...` entry point, every benchmark and example script."""
import argparse
import glob
import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from adapt_pretrain.cli import SUBCOMMANDS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_version_is_setup_py_version():
    with open(os.path.join(REPO, "setup.py")) as f:
        expected = re.search(r'version="([^"]+)"', f.read()).group(1)
    out = subprocess.run([sys.executable, "-m", "adapt_pretrain.cli", "--version"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"adapt-pretrain {expected}"


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        else:
            yield parser.prog, action


def _flags_without_help(parser: argparse.ArgumentParser) -> list[str]:
    return [f"{prog}: {'/'.join(a.option_strings) or a.dest}" for prog, a in _actions(parser)
            if not (a.help and a.help.strip()) or a.help == argparse.SUPPRESS]


def _has_command_line(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        source = f.read()
    return "argparse" in source and 'if __name__ == "__main__"' in source


def _entry_modules() -> list[str]:
    """Every module of the package runnable as `python -m` that parses a command line."""
    paths = glob.glob(os.path.join(REPO, "adapt_pretrain", "**", "*.py"), recursive=True)
    return sorted(os.path.relpath(p, REPO)[:-3].replace(os.sep, ".") for p in paths if _has_command_line(p))


def _scripts() -> list[str]:
    """The benchmark and example scripts that parse a command line."""
    paths = glob.glob(os.path.join(REPO, "benchmarks", "*.py"))
    paths += glob.glob(os.path.join(REPO, "launch", "**", "*.py"), recursive=True)
    return sorted(os.path.relpath(p, REPO) for p in paths if _has_command_line(p))


def _script_parser(path: str) -> argparse.ArgumentParser:
    name = f"_cli_surface_{os.path.basename(path)[:-3]}"
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the script's main() runs only under __main__
    assert hasattr(module, "build_parser"), f"{path} parses its command line without a build_parser()"
    return module.build_parser()


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_flag_has_help(command):
    parser = importlib.import_module(SUBCOMMANDS[command][0]).build_parser()
    missing = _flags_without_help(parser)
    assert not missing, f"flags without help text: {missing}"


def test_entry_points_and_scripts_are_found():
    """The discovery below sees what it should (an empty list would pass every check vacuously)."""
    modules, scripts = _entry_modules(), _scripts()
    assert {"adapt_pretrain.train", "adapt_pretrain.monitor.verify",
            "adapt_pretrain.experiments.methods.offline"} <= set(modules)
    assert {"benchmarks/bench_loss.py", "benchmarks/bench_monitor_overhead.py",
            "launch/examples/deepspeed_hf.py"} <= set(scripts)


@pytest.mark.parametrize("module", _entry_modules())
def test_every_entry_point_flag_has_help(module):
    imported = importlib.import_module(module)
    assert hasattr(imported, "build_parser"), f"python -m {module} parses its command line without a build_parser()"
    missing = _flags_without_help(imported.build_parser())
    assert not missing, f"python -m {module}: flags without help text: {missing}"


@pytest.mark.parametrize("script", _scripts())
def test_every_script_flag_has_help(script):
    missing = _flags_without_help(_script_parser(script))
    assert not missing, f"{script}: flags without help text: {missing}"

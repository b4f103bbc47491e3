"""The command line explains itself: `--version` from setup.py, help text on every flag of every subcommand."""
import argparse
import importlib
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


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_flag_has_help(command):
    module = importlib.import_module(SUBCOMMANDS[command][0])
    parser = module.build_parser()
    missing = [f"{prog}: {'/'.join(a.option_strings) or a.dest}" for prog, a in _actions(parser)
               if not (a.help and a.help.strip()) or a.help == argparse.SUPPRESS]
    assert not missing, f"flags without help text: {missing}"

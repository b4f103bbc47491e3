"""The experiment harness stays out of the training path, and setup.py ships every package."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINING_PATH = ["adapt_pretrain.train", "adapt_pretrain.core", "adapt_pretrain.megatron", "adapt_pretrain.megatron.plugin",
                 "adapt_pretrain.data", "adapt_pretrain.data.stream", "adapt_pretrain.monitor",
                 "adapt_pretrain.monitor.monitor", "adapt_pretrain.flops"]


def test_training_path_never_imports_the_harness():
    code = ("import importlib, sys\n"
            f"for name in {TRAINING_PATH!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('adapt_pretrain.experiments')))\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_setup_finds_every_package():
    setuptools = pytest.importorskip("setuptools")
    from distutils.core import run_setup  # setuptools provides distutils on 3.12+
    del setuptools
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        packages = set(run_setup("setup.py", stop_after="init").packages)
    finally:
        os.chdir(cwd)
    on_disk = {os.path.relpath(root, REPO).replace(os.sep, ".") for root, _, files in os.walk(os.path.join(REPO, "adapt_pretrain"))
               if "__init__.py" in files}
    assert on_disk <= packages
    assert {"adapt_pretrain.experiments", "adapt_pretrain.experiments.methods", "adapt_pretrain.kernels"} <= packages

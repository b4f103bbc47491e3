"""Runs the "triton" cases of this folder in Triton's interpreter, in a fresh process.

TRITON_INTERPRET must be set before triton is imported and must not leak into other test
folders, so on a CPU-only machine the Triton kernels are exercised by a child pytest with the
environment set from its first line. On a CUDA machine the same cases run compiled in-process.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import FORCE_ENV, HAS_CUDA, INTERPRETED

HERE = Path(__file__).resolve().parent
MIN_CASES = 25  # the triton-parametrised cases collected in this folder; guards a silent no-op


@pytest.mark.skipif(HAS_CUDA or INTERPRETED, reason="triton cases run in this process already")
def test_triton_cases_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", **{FORCE_ENV: "1"})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE),
           "-k", "triton and not vocab_parallel and not interpreter", "-W", "error::RuntimeWarning"]
    proc = subprocess.run(cmd, env=env, cwd=HERE.parents[1], capture_output=True, text=True,
                          timeout=600)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= MIN_CASES, report

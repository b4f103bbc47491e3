#!/usr/bin/env bash
# Create (or reuse) .venv and install adapt-pretrain with the tested versions (constraints.txt).
# torch goes first and pinned: letting pip pick torch on its own pulls a multi-GB CUDA build on CPU
# hosts; every later pip call passes the same constraints, so nothing can move torch afterwards.
# DS_BUILD_OPS=0 skips deepspeed's C++ op pre-compilation at install time.
# Into an existing stack instead (its own torch): `pip install -e .` (ranges in setup.py, README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ADAPT_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.adapt-install-$(cat setup.py constraints.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  pip install -q --upgrade pip >/dev/null 2>&1 || true
  pip install -q -c constraints.txt torch
  DS_BUILD_OPS=0 pip install -q -c constraints.txt -e ".[test]"
  touch "$stamp"
fi

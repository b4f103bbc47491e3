#!/usr/bin/env bash
# Create (or reuse) .venv and install adapt-pretrain with pinned versions on a fresh machine.
# torch goes first and pinned: letting pip pick torch on its own pulls a multi-GB CUDA build on CPU hosts.
# DS_BUILD_OPS=0 skips deepspeed's C++ op pre-compilation at install time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ADAPT_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.adapt-install-$(sha1sum setup.py | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  pip install -q --upgrade pip >/dev/null 2>&1 || true
  pip install -q torch==2.13.0
  DS_BUILD_OPS=0 pip install -q -e ".[test]"
  touch "$stamp"
fi

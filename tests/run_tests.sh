#!/usr/bin/env bash
# The test command (README, CI): installs what it needs on a fresh machine, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
# shellcheck disable=SC1091
. "${ADAPT_VENV:-.venv}/bin/activate"
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m pytest -q tests "$@"

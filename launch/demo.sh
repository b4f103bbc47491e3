#!/usr/bin/env bash
# The README's main job: install (first time), then pretrain the demo GPT on the bundled corpus with
# ADAPT on as 2 CPU processes started by the deepspeed launcher, then render the curriculum plots.
#   bash launch/demo.sh [section.key=value ...]      e.g. bash launch/demo.sh train.steps=100
# Output: runs/demo-cpu/ (metrics.jsonl, W&B offline run, checkpoints, report/). Re-running resumes
# the run in runs/demo-cpu if it has checkpoints (delete the folder to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
# shellcheck disable=SC1091
. "${ADAPT_VENV:-.venv}/bin/activate"
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=${WANDB_SILENT:-true} TOKENIZERS_PARALLELISM=false
START=$(date +%s)
deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" --module adapt_pretrain.train \
  --config launch/configs/demo-cpu.yaml "$@" --resume
echo "[demo] training took $(( $(date +%s) - START ))s"
adapt-pretrain report runs/demo-cpu

#!/usr/bin/env bash
# One node, N processes (GPUs; on a CPU-only host deepspeed picks its CPU accelerator and N gloo processes).
#   bash launch/single_node.sh launch/configs/gpt-125m.yaml [section.key=value ...]
# Env: NUM_GPUS (default: all GPUs, or 2 on CPU), MASTER_PORT (default 29500).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?usage: single_node.sh CONFIG [overrides...]}"; shift
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
  --module adapt_pretrain.train --config "$CONFIG" "$@"

#!/usr/bin/env bash
# Several nodes from one command: deepspeed reaches the other hosts over ssh (pdsh) using a hostfile.
#   HOSTFILE=launch/hostfile.example NUM_NODES=2 NUM_GPUS=8 MASTER_ADDR=10.0.0.1 \
#     bash launch/multi_node.sh launch/configs/gpt-1b.yaml
# Needs passwordless ssh between the nodes and the same checkout/venv path everywhere; run_dir must be
# on a filesystem every node sees (checkpoints are written by every rank). Without ssh use
# multi_node_no_ssh.sh (one command per node) or slurm.sbatch.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?usage: multi_node.sh CONFIG [overrides...]}"; shift
exec deepspeed --hostfile "${HOSTFILE:-launch/hostfile.example}" --num_nodes "${NUM_NODES:-2}" \
  --num_gpus "${NUM_GPUS:-8}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}" \
  --master_port "${MASTER_PORT:-29500}" --module adapt_pretrain.train --config "$CONFIG" "$@"

#!/usr/bin/env bash
# Several nodes without ssh: run this once on every node with its own NODE_RANK (0..NUM_NODES-1).
#   node 0:  NODE_RANK=0 NUM_NODES=2 NUM_GPUS=8 MASTER_ADDR=10.0.0.1 bash launch/multi_node_no_ssh.sh CONFIG
#   node 1:  NODE_RANK=1 NUM_NODES=2 NUM_GPUS=8 MASTER_ADDR=10.0.0.1 bash launch/multi_node_no_ssh.sh CONFIG
# deepspeed 0.19.8 still reads a hostfile in this mode to learn the slots per node (the names are not
# contacted); one is generated from NUM_NODES/NUM_GPUS unless HOSTFILE is given. run_dir must be on a
# filesystem every node sees.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?usage: multi_node_no_ssh.sh CONFIG [overrides...]}"; shift
NUM_NODES="${NUM_NODES:-2}"; NUM_GPUS="${NUM_GPUS:-8}"
if [ -z "${HOSTFILE:-}" ]; then
  HOSTFILE="$(mktemp -t adapt-hostfile.XXXXXX)"
  for i in $(seq 0 $((NUM_NODES - 1))); do echo "node$i slots=$NUM_GPUS"; done > "$HOSTFILE"
fi
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "${NODE_RANK:?set NODE_RANK}" \
  --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS" \
  --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}" --master_port "${MASTER_PORT:-29500}" \
  --module adapt_pretrain.train --config "$CONFIG" "$@"

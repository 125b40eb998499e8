#!/usr/bin/env bash
# One torchrun agent per node; the agents meet through a c10d rendezvous hosted by node 0.
# Run the same command on every node, each with its own NODE_RANK (and LOCAL_ADDR).
#
# Usage: NNODES=N NODE_RANK=R RDZV_ENDPOINT=HOST0:PORT [variables] launch/torchrun_multi_node.sh [train options]
#   node0$ NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=10.0.0.1:29400 LOCAL_ADDR=10.0.0.1 launch/torchrun_multi_node.sh --run-dir /shared/runs/a
#   node1$ NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=10.0.0.1:29400 LOCAL_ADDR=10.0.0.2 launch/torchrun_multi_node.sh --run-dir /shared/runs/a
# Variables:
#   NNODES          number of nodes (required)
#   RDZV_ENDPOINT   HOST:PORT of node 0, where the rendezvous store listens (required)
#   NODE_RANK       0 on the node at RDZV_ENDPOINT: it hosts the store; others connect to it. Unset:
#                   torchrun guesses from the host name, which fails when every node resolves its own
#                   name to 127.0.0.1. (Global ranks are assigned by the rendezvous.)
#   LOCAL_ADDR      this node's address as the other nodes reach it; the workers use rank 0's as
#                   MASTER_ADDR. Unset: torchrun uses the host name, which must then resolve correctly.
#   NPROC_PER_NODE  processes per node, the same on every node (default: visible GPUs, else 1)
#   RDZV_ID         job id shared by all nodes (default: $SLURM_JOB_ID, else ddp-mnist-<hash of the endpoint,
#                   NNODES and the train options>: the same on every node running this command, and another
#                   for another job; a new start with a reused id is still a new job, never a restart)
#   MAX_RESTARTS    torchrun's elastic restarts (default 0; a restarted job resumes from its run folder)
#   PYTHON          interpreter (default python3)
# --run-dir must be on a file system every node sees (only rank 0 writes it).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}

: "${NNODES:?set NNODES to the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to HOST:PORT of node 0}"
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')
fi

if [[ -z ${RDZV_ID:-} ]]; then
  RDZV_ID=${SLURM_JOB_ID:-ddp-mnist-$(printf '%s\n' "$RDZV_ENDPOINT" "$NNODES" "$@" | md5sum | cut -c1-12)}
fi

extra=()
if [[ -n ${NODE_RANK:-} ]]; then
  extra+=("--rdzv_conf=is_host=$(( NODE_RANK == 0 ? 1 : 0 ))")
fi
if [[ -n ${LOCAL_ADDR:-} ]]; then
  extra+=("--local_addr=$LOCAL_ADDR")
fi

exec "$PYTHON" -m ddp_mnist.commands.torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID" \
  --max_restarts="${MAX_RESTARTS:-0}" "${extra[@]}" \
  -m ddp_mnist train --expected-world-size "$(( NNODES * NPROC_PER_NODE ))" "$@"

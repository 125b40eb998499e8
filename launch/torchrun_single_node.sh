#!/usr/bin/env bash
# NPROC processes on this machine under torchrun: one per GPU, or NPROC CPU processes on gloo.
#
# Usage: [NPROC=N] launch/torchrun_single_node.sh [ddp-mnist train options]
#   launch/torchrun_single_node.sh --run-dir runs/ddp      # one process per GPU (2 on a CPU machine)
#   NPROC=4 launch/torchrun_single_node.sh --device cpu    # 4 CPU processes, gloo
# Variables: NPROC (default: the number of visible GPUs, else 2), MAX_RESTARTS (torchrun's elastic
#   restarts, default 0; a restarted job resumes from its run folder), PYTHON (default python3).
# --standalone hosts the rendezvous on a free local port, so two jobs on one machine do not collide.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}

if [[ -z ${NPROC:-} ]]; then
  NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi

# --expected-world-size: a launcher that started a different number of processes fails loudly.
exec "$PYTHON" -m ddp_mnist.commands.torchrun --standalone --nproc_per_node="$NPROC" \
  --max_restarts="${MAX_RESTARTS:-0}" \
  -m ddp_mnist train --expected-world-size "$NPROC" "$@"

#!/usr/bin/env bash
# NPROC processes on this machine under `accelerate launch` (config: launch/accelerate_config.yaml).
#
# Usage: [NPROC=N] launch/accelerate.sh [ddp-mnist train options]
#   launch/accelerate.sh --run-dir runs/accelerate          # one process per GPU (2 on a CPU machine)
#   NPROC=4 launch/accelerate.sh --recipe tutorial
# Variables: NPROC (default: the number of visible GPUs, else 2), MAIN_PROCESS_PORT (default: a free
#   port), ACCELERATE_CONFIG (default: launch/accelerate_config.yaml), PYTHON (default python3).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONPATH="${HERE%/launch}${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}

if [[ -z ${NPROC:-} ]]; then
  NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
if [[ -z ${MAIN_PROCESS_PORT:-} ]]; then
  MAIN_PROCESS_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# --expected-world-size: accelerate can silently start one process (e.g. with --cpu); fail loudly then.
exec "$PYTHON" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-$HERE/accelerate_config.yaml}" \
  --num_processes "$NPROC" --main_process_port "$MAIN_PROCESS_PORT" \
  -m ddp_mnist train --expected-world-size "$NPROC" "$@"

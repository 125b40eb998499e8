#!/usr/bin/env bash
# One process, on the CPU or on one GPU (no process group, world size 1).
#
# Usage: launch/single.sh [ddp-mnist train options]
#   launch/single.sh --recipe tutorial --epochs 1 --run-dir runs/single
#   PYTHON=/path/to/python launch/single.sh ...   # another interpreter (default: python3)
set -euo pipefail
# Works from a checkout without `pip install`: the repository root goes first on the import path.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

exec "${PYTHON:-python3}" -m ddp_mnist train "$@"

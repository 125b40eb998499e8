#!/usr/bin/env bash
# Every GPU check of the fast path in one run (a few minutes on one H100): the GPU-only tests (captured
# step == eager step, DDP over NCCL, resume into a captured step), then the full benchmark, printed and
# written to benchmarks/bench-gpu.md and .json. Extra arguments go to `ddp-mnist bench`.
# Data: $DDP_MNIST_DATA (a folder holding MNIST/raw/), default ./.data.
set -euo pipefail
cd "$(dirname "$0")/.."
export DDP_MNIST_DATA=${DDP_MNIST_DATA:-$PWD/.data}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m pytest -q -rs tests/test_fast_path.py -k gpu || echo "gpu_check: the GPU tests FAILED; the benchmark runs anyway"
python3 -m ddp_mnist bench --out benchmarks/bench-gpu.md --out benchmarks/bench-gpu.json "$@"

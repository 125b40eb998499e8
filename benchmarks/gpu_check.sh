#!/usr/bin/env bash
# The GPU check: what the CUDA path needs measured, in one run of under 5 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh [--rehearse] [more `ddp-mnist bench` arguments]
#
# Parts, each under its own time budget; a part that fails or runs out of time is recorded and the next runs:
#   versions   versions.txt (python, torch, CUDA, cuDNN, NCCL, driver, GPUs, data), nvidia-smi.txt
#   gpu-tests  tests/test_gpu.py: gpu-tests.log (pytest -rA), gpu-tests.xml (JUnit)
#   bench-mlp  ddp-mnist bench --models mlp: bench-gpu-mlp.md and .json (rewritten after every row)
#   bench-cnn  ddp-mnist bench --models cnn --recipes fast: bench-gpu-cnn.md and .json
#   startup    `ddp-mnist train` (the quick start), wall time minus training time: startup.json
# Each part's output is in PART.log; at the end, a table of the parts and of the targets in docs/speed.md,
# printed and written to summary.md (benchmarks/gpu_check.py). Exit status 0 when every part passed.
#
# Output folder: $OUT when set (a GPU machine lent for the check sends back what is under $OUT), else a new
# folder benchmarks/out/TIME/ (git-ignored; the committed tables in benchmarks/ are never written).
# Data: MNIST from where `ddp-mnist train` takes it by default (the copy inside the package), unless
# DDP_MNIST_DATA names a folder. The code: this checkout's, installed or not (PYTHONPATH).
#
# --rehearse: the same parts on the CPU with tiny sizes, in under a minute (tests/test_gpu_check.py runs it):
# the GPU tests are collected and skip, the bench parts run quick smoke runs (the CNN's part benches the MLP's
# tutorial recipe instead: the CNN takes minutes on two cores), the start-up run trains 5 steps.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
rehearse=()
if [[ ${1:-} == --rehearse ]]; then rehearse=(--rehearse); shift; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# The package decompresses its MNIST copy into ~/.cache/ddp-mnist: elsewhere when that cannot be written.
cache=${XDG_CACHE_HOME:-${HOME:-/nonexistent}/.cache}
if ! { mkdir -p "$cache" && [[ -w $cache ]]; } 2>/dev/null; then export XDG_CACHE_HOME; XDG_CACHE_HOME=$(mktemp -d); fi

out=${OUT:-benchmarks/out/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1
: > "$out/parts.tsv"
t0=$SECONDS

# part NAME BUDGET_S SIGNAL "FILES" COMMAND...: COMMAND under `timeout` (SIGNAL at the budget, SIGKILL 10 s
# later, to its whole process group), its output in NAME.log; one line in parts.tsv says how it ended
# (status 124 or 137: out of time). The shell's own "Killed" line is not printed: the summary says it.
part() {
  local name=$1 budget=$2 signal=$3 files=$4 start=$SECONDS rc=0
  shift 4
  echo "[gpu_check $((SECONDS - t0)) s] $name (budget $budget s)"
  { timeout -s "$signal" -k 10 "$budget" "$@" >"$out/$name.log" 2>&1; } 2>/dev/null || rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$budget" "$files" >>"$out/parts.tsv"
}

if (( ${#rehearse[@]} )); then
  tiny=(--quick --max-steps 2 --warmup-steps 0 --device cpu)
  mlp=(--models mlp --recipes fast "${tiny[@]}")
  cnn=(--models mlp --recipes tutorial "${tiny[@]}")
  train=(--max-steps 5)
else
  mlp=(--models mlp)
  cnn=(--models cnn --recipes fast)
  train=()
fi
bench=(python3 -m ddp_mnist bench)

part versions 20 KILL "versions.txt nvidia-smi.txt" python3 benchmarks/gpu_check.py versions "$out" "${rehearse[@]}"
# SIGINT: pytest stops as on Ctrl-C, still writing its report and the JUnit file.
part gpu-tests 120 INT "gpu-tests.log gpu-tests.xml" python3 benchmarks/gpu_check.py gpu-tests "$out"
part bench-mlp 70 KILL "bench-gpu-mlp.md bench-gpu-mlp.json" "${bench[@]}" "${mlp[@]}" "$@" \
  --out "$out/bench-gpu-mlp.md" --out "$out/bench-gpu-mlp.json"
part bench-cnn 45 KILL "bench-gpu-cnn.md bench-gpu-cnn.json" "${bench[@]}" "${cnn[@]}" "$@" \
  --out "$out/bench-gpu-cnn.md" --out "$out/bench-gpu-cnn.json"
part startup 30 KILL "startup.json" python3 benchmarks/gpu_check.py startup "$out" "${train[@]}"

python3 benchmarks/gpu_check.py summary "$out" --seconds $((SECONDS - t0)) "${rehearse[@]}"

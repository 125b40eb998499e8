#!/usr/bin/env bash
# Scaling sweep on SLURM: the same training at several world sizes, one batch job per world size, each
# into its own run folder RUN_ROOT/ws<N>/ (its log: RUN_ROOT/ws<N>/train.log); with VARIANTS, one such
# sweep per variant, in RUN_ROOT/<variant>/ws<N>/; with ARRAY=1, the variants of a world size as one job array. Run it on the login node; it only submits. A world size up to RANKS_PER_NODE runs on one node
# (slurm/single_node.sh), a larger one on N / RANKS_PER_NODE full nodes (slurm/multi_node.sh).
#
# Usage: [variables] bash slurm/sweep.sh [sbatch options] [-- ddp-mnist train options]
#   WORLD_SIZES="1 2 4 8 16 32" bash slurm/sweep.sh --partition=gpu --account=me --time=0:30:00 -- --model cnn
#   VARIANTS="--comm-hook none; --comm-hook fp16; --strategy zero1; --strategy fsdp" bash slurm/sweep.sh -- --batch-size 510
#   GPUS_PER_NODE=0 RANKS_PER_NODE=2 WORLD_SIZES="1 2" bash slurm/sweep.sh    # CPU-only cluster, gloo
# Variables:
#   WORLD_SIZES     world sizes, space-separated (default: 1 2 4 8)
#   GPUS_PER_NODE   GPUs per node, one per rank (default: 8); 0 on a CPU-only cluster
#   RANKS_PER_NODE  most ranks on one node (default: GPUS_PER_NODE)
#   RUN_ROOT        the sweep's folder (default: runs/sweep-<date>-<time>)
#   VARIANTS        sets of train flags separated by ";", one sweep each, added to the flags after --
#                   (e.g. DDP's knobs); folder names as `ddp-mnist scale --variant` gives them
#   ARRAY           1: one job array per world size, one element per variant (SLURM gives every element of an
#                   array the same resources, so each world size is an array of its own), logs in
#                   RUN_ROOT/ws<N>-<element>.log; default 0: one job per variant and world size
#   BATCH_PER_RANK  weak scaling: global batch = BATCH_PER_RANK x N (default: unset, strong scaling:
#                   every run trains with the same global batch, the recipe's or --batch-size)
#   TOPOLOGY, DATA_DIR, PYTHON, REQUEUE_SIGNAL: passed to the jobs (see slurm/lib.sh)
# When the jobs are done: ddp-mnist scale --from-runs RUN_ROOT   (scaling.csv/.md/.png into RUN_ROOT; with
# VARIANTS, each variant's report in its folder and the variants compared in one table in RUN_ROOT)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
WORLD_SIZES=${WORLD_SIZES:-1 2 4 8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RANKS_PER_NODE=${RANKS_PER_NODE:-$GPUS_PER_NODE}
RUN_ROOT=${RUN_ROOT:-runs/sweep-$(date +%Y%m%d-%H%M%S)}
ARRAY=${ARRAY:-0}
# The jobs find slurm/lib.sh here, whatever folder the sweep was started from.
export DDP_MNIST_DIR=${DDP_MNIST_DIR:-$(dirname "$HERE")}
# One W&B group per sweep (used only with --wandb).
export WANDB_RUN_GROUP=${WANDB_RUN_GROUP:-$(basename "$RUN_ROOT")}

sbatch_args=() train_args=()
while (( $# )); do
  if [[ $1 == -- ]]; then shift; train_args=("$@"); break; fi
  sbatch_args+=("$1"); shift
done
if (( RANKS_PER_NODE < 1 )); then
  echo "RANKS_PER_NODE must be at least 1 (on a CPU-only cluster set e.g. GPUS_PER_NODE=0 RANKS_PER_NODE=4)" >&2
  exit 2
fi

# Every world size is checked before any job is submitted.
for n in $WORLD_SIZES; do
  if (( n < 1 || (n > RANKS_PER_NODE && n % RANKS_PER_NODE) )); then
    echo "world size $n: use 1..$RANKS_PER_NODE (one node) or a multiple of RANKS_PER_NODE=$RANKS_PER_NODE" >&2
    exit 2
  fi
done

# Each variant: its train flags and its folder (named by the package, like `ddp-mnist scale --variant`).
variant_flags=() variant_names=()
if [[ -z ${VARIANTS:-} ]]; then
  variant_flags=("") variant_names=("")
else
  IFS=';' read -r -a variant_list <<< "$VARIANTS"
  for v in "${variant_list[@]}"; do
    [[ -n ${v// /} ]] || continue
    variant_flags+=("$v")
  done
  if (( ${#variant_flags[@]} )); then  # one Python start-up for all the names, each split as it is passed below
    names=$(PYTHONPATH="$DDP_MNIST_DIR${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
            'import sys; from ddp_mnist.scaling.sweep import variant_name; print(*(variant_name(v.split()) for v in sys.argv[1:]), sep="\n")' \
            "${variant_flags[@]}")
    mapfile -t variant_names <<< "$names"
  fi
fi

for n in $WORLD_SIZES; do
  if (( n <= RANKS_PER_NODE )); then
    nodes=1 per_node=$n script=single_node.sh
  else
    nodes=$(( n / RANKS_PER_NODE )) per_node=$RANKS_PER_NODE script=multi_node.sh
  fi
  options=(--job-name="ddp-mnist-ws$n" --nodes="$nodes" --ntasks-per-node="$per_node")
  if (( GPUS_PER_NODE > 0 )); then options+=(--gpus-per-node="$per_node"); fi
  batch=()
  if [[ -n ${BATCH_PER_RANK:-} ]]; then batch=(--batch-size "$(( BATCH_PER_RANK * n ))"); fi
  shape="$nodes node(s) x $per_node rank(s)"
  plan=()  # ARRAY=1: one line per variant (array element): its run folder, a tab, its flags
  for i in "${!variant_names[@]}"; do
    name=${variant_names[$i]}
    root=$RUN_ROOT${name:+/$name}
    mkdir -p "$root/ws$n"  # sbatch writes the log there
    if [[ $ARRAY == 1 ]]; then
      plan+=("$root/ws$n"$'\t'"${variant_flags[$i]}${batch[*]:+ ${batch[*]}}")  # the order of a job of its own
      continue
    fi
    read -r -a flags <<< "${variant_flags[$i]}"  # flags separated by spaces
    job=$(RUN_DIR="$root/ws$n" sbatch --parsable "${options[@]}" --output="$root/ws$n/train.log" "${sbatch_args[@]}" \
            "$HERE/$script" "${train_args[@]}" "${flags[@]}" "${batch[@]}")
    echo "${name:+$name/}ws$n: job $job ($shape) -> $root/ws$n, log $root/ws$n/train.log"
  done
  if [[ $ARRAY == 1 ]]; then
    printf '%s\n' "${plan[@]}" > "$RUN_ROOT/ws$n.array"
    job=$(ARRAY_PLAN="$RUN_ROOT/ws$n.array" sbatch --parsable --array="0-$(( ${#plan[@]} - 1 ))" "${options[@]}" \
            --output="$RUN_ROOT/ws$n-%a.log" "${sbatch_args[@]}" "$HERE/$script" "${train_args[@]}")
    for i in "${!variant_names[@]}"; do
      name=${variant_names[$i]}
      root=$RUN_ROOT${name:+/$name}
      echo "${name:+$name/}ws$n: job ${job}_$i ($shape) -> $root/ws$n, log $RUN_ROOT/ws$n-$i.log"
    done
  fi
done

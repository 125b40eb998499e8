#!/usr/bin/env bash
# ddp-mnist on SEVERAL nodes as a SLURM batch job: one rank per GPU, or CPU ranks on gloo without GPUs.
# Topology: TOPOLOGY=torchrun (default: one torchrun agent per node; the agents meet in a c10d
# rendezvous on the job's first node, port from the job id) or TOPOLOGY=srun (one SLURM task per
# rank). Ranks per node = --ntasks-per-node. Submit from the repository root:
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 slurm/multi_node.sh [ddp-mnist train options]
# RUN_DIR and DATA_DIR must be on a file system every node sees.
# Change things with sbatch options and variables (see slurm/lib.sh), never by editing this file.
# Time limit: rank 0 reads the job's end time and, before it (--time-limit-margin-s, 60 s), the ranks
# write a checkpoint and this script requeues the job, which resumes from it; no --signal needed. Preemption
# or a warning signal (sbatch --signal=USR1@120; where NCCL or the site owns USR1: REQUEUE_SIGNAL=USR2
# sbatch --signal=USR2@120 ...) does the same. The job ends COMPLETED once results.json is written,
# whatever signal comes after that.
#SBATCH --job-name=ddp-mnist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
TOPOLOGY=${TOPOLOGY:-torchrun}
# sbatch runs a copy of this file: the helpers are found from the submit folder (or DDP_MNIST_DIR).
DDP_MNIST_DIR=${DDP_MNIST_DIR:-$SLURM_SUBMIT_DIR}
[[ -f $DDP_MNIST_DIR/slurm/lib.sh ]] || { echo "no slurm/lib.sh in $DDP_MNIST_DIR: submit from the" \
  "ddp-mnist repository root, or set DDP_MNIST_DIR to it" >&2; exit 2; }
# shellcheck source=slurm/lib.sh
source "$DDP_MNIST_DIR/slurm/lib.sh"
run_training "$@"

# shellcheck shell=bash
# Shared by the batch scripts in this folder (sourced, not run): turns the SLURM allocation into one
# `ddp-mnist train` job and passes SLURM's warning signal on to the ranks.
#
# Settings, all environment variables (sbatch hands the submitting shell's environment to the job):
#   TOPOLOGY  torchrun: one torchrun agent per node starts that node's ranks; the agents meet in a c10d
#             rendezvous on the job's first node. srun: one SLURM task per rank; the package reads
#             SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS. Each script sets its default at its top.
#   RUN_DIR   the run folder (default: runs/<job name>-<job id> under the submit folder). It keeps the
#             job id, so a requeued job finds its checkpoints.
#   DATA_DIR  folder holding MNIST/raw/ (default: $DDP_MNIST_DATA, else ./data)
#   PYTHON    interpreter with torch installed (default: python3)
# Ranks per node = sbatch's --ntasks-per-node, under both topologies. With GPUs, also ask for as many
# GPUs per node (--gpus-per-node); without any GPU in the allocation the ranks run on CPUs with gloo.

PYTHON=${PYTHON:-python3}
# The repository (the scripts' parent folder) is importable without installing the package.
export PYTHONPATH="$DDP_MNIST_DIR${PYTHONPATH:+:$PYTHONPATH}"

# The rendezvous port: the same rule as ddp_mnist.distributed.slurm_port, so that two jobs sharing a
# node do not collide (tests/test_slurm.py checks that both agree).
job_port() {
  echo $(( 20000 + $1 % 20000 ))
}

# SLURM writes the tasks per node as e.g. `4` or `4(x2)`; every node runs the same number of ranks.
ranks_per_node() {
  echo "${SLURM_TASKS_PER_NODE%%[(,]*}"
}

# The training job under $TOPOLOGY; arguments are extra `ddp-mnist train` options.
run_training() {
  : "${SLURM_JOB_ID:?submit this script with sbatch (or run it inside an salloc allocation)}"
  local nodes=$SLURM_JOB_NUM_NODES per_node hosts
  per_node=$(ranks_per_node)
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  # Rank 0 runs on the first node: the srun topology's ranks read MASTER_ADDR, torchrun's agents meet there.
  export MASTER_ADDR=${hosts%%$'\n'*}

  local train=(-m ddp_mnist train --run-dir "${RUN_DIR:-runs/$SLURM_JOB_NAME-$SLURM_JOB_ID}"
               --expected-world-size "$(( nodes * per_node ))")
  if [[ -n ${DATA_DIR:-} ]]; then train+=(--data-dir "$DATA_DIR"); fi
  # No GPU in the allocation: CPU ranks on gloo, also on a node whose GPUs belong to other jobs.
  # (A site without GPU scheduling: pass --device cuda.)
  if (( ${SLURM_GPUS_ON_NODE:-0} == 0 )); then train+=(--device cpu); fi
  # One thread per CPU the job asked for per rank (--cpus-per-task), under both topologies.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

  local step
  case $TOPOLOGY in
    torchrun)
      # One task per node holding all of the node's CPUs. The agent must survive SIGUSR1 and pass it
      # to its workers: torchrun handles only TERM, INT, HUP and QUIT unless told otherwise (the
      # option needs torch 2.9 or later; with an older torch use TOPOLOGY=srun).
      step=(srun --ntasks-per-node=1 --ntasks="$nodes" --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1
            "$PYTHON" -m torch.distributed.run --nnodes="$nodes" --nproc-per-node="$per_node"
            --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$(job_port "$SLURM_JOB_ID")"
            --rdzv-id="$SLURM_JOB_ID" --max-restarts=0
            "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" "${train[@]}" "$@") ;;
    srun)
      # Not every SLURM version's srun takes --cpus-per-task over from sbatch: say it again.
      step=(srun --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 "$PYTHON" "${train[@]}" "$@") ;;
    *)
      echo "TOPOLOGY=$TOPOLOGY is not a topology: use torchrun or srun" >&2
      return 2 ;;
  esac
  echo "ddp-mnist: SLURM job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), $TOPOLOGY topology," \
       "$nodes node(s) x $per_node rank(s), first node $MASTER_ADDR"
  run_step "${step[@]}"
}

# Runs the job step and waits for it. `--signal=B:USR1@N` signals only this shell: pass the signal to
# the step (srun forwards it to every process of its tasks), where the package checkpoints and
# requeues the job. A bash trap runs only between commands or inside `wait`, hence `&` and `wait`.
# SIGTERM (scancel, scontrol requeue, the time limit) needs no forwarding: SLURM signals the steps.
STEP_PID=
forward_usr1() {
  echo "ddp-mnist: batch script got SIGUSR1, passing it to the ranks"
  if [[ -n $STEP_PID ]]; then kill -USR1 "$STEP_PID" 2>/dev/null || true; fi
}
run_step() {
  trap forward_usr1 USR1
  "$@" &
  STEP_PID=$!
  local rc=0
  wait "$STEP_PID" || rc=$?
  while kill -0 "$STEP_PID" 2>/dev/null; do  # `wait` returned for the signal: the step still runs
    rc=0
    wait "$STEP_PID" || rc=$?
  done
  return "$rc"
}

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
#   ARRAY_PLAN  set by slurm/sweep.sh (ARRAY=1): a file with one line per element of the job array, the
#             element's run folder, a tab, its extra train options; each element takes its own line
#   PREFLIGHT 1: run `ddp-mnist doctor` on the allocation first, in the same job, and stop the job (with
#             doctor's exit status) when it names a slow node or link or a failed check (default: 0)
#   REQUEUE_SIGNAL  the warning signal that means "checkpoint, then requeue" (default: USR1; USR2 where
#             NCCL or the site owns USR1). Ask SLURM for the same one: sbatch --signal=USR2@120 (or B:USR2@120)
# Ranks per node = sbatch's --ntasks-per-node, under both topologies. With GPUs, also ask for as many
# GPUs per node (--gpus-per-node); without any GPU in the allocation the ranks run on CPUs with gloo.

PYTHON=${PYTHON:-python3}
REQUEUE_SIGNAL=${REQUEUE_SIGNAL:-USR1}
# The file the ranks leave in the run folder when they stopped for a requeue (ddp_mnist/artifacts/run_dir.py).
REQUEUE_MARKER=requeue-requested
# The package leaves the requeue to this script (ddp_mnist/commands/cli.py: after_stop).
export DDP_MNIST_SCRIPT_REQUEUES=1
# The repository (the scripts' parent folder) is importable without installing the package.
export PYTHONPATH="$DDP_MNIST_DIR${PYTHONPATH:+:$PYTHONPATH}"

# The rendezvous port: the same rule as ddp_mnist.parallel.env.slurm_port, so that two jobs sharing a
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

  local run_dir=${RUN_DIR:-runs/$SLURM_JOB_NAME-$(this_job)} line plan=()
  if [[ -n ${ARRAY_PLAN:-} ]]; then  # this element's own line: its run folder and options
    line=$(sed -n "$(( ${SLURM_ARRAY_TASK_ID:?ARRAY_PLAN needs a job array} + 1 ))p" "$ARRAY_PLAN")
    [[ $line == *$'\t'* ]] || { echo "$ARRAY_PLAN has no line for array element $SLURM_ARRAY_TASK_ID" >&2; return 2; }
    run_dir=${line%%$'\t'*}
    read -r -a plan <<< "${line#*$'\t'}"
  fi
  # What training and the preflight's doctor share: the data, and the device.
  local shared=()
  if [[ -n ${DATA_DIR:-} ]]; then shared+=(--data-dir "$DATA_DIR"); fi
  # No GPU in the allocation: CPU ranks on gloo, also on a node whose GPUs belong to other jobs.
  # (A site without GPU scheduling: pass --device cuda.)
  if (( ${SLURM_GPUS_ON_NODE:-0} == 0 )); then shared+=(--device cpu); fi
  local train=(-m ddp_mnist train --run-dir "$run_dir" --requeue-signal "$REQUEUE_SIGNAL"
               --expected-world-size "$(( nodes * per_node ))" "${shared[@]}")
  # One thread per CPU the job asked for per rank (--cpus-per-task), under both topologies.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  # Each task starts with the warning signal ignored: the torchrun agent must neither die of it nor
  # turn it into a failure (it raises SignalException for the signals it handles, even after the ranks
  # are done); the ranks install their own handler, and SLURM signals every process of the step.
  # shellcheck disable=SC2016  # $0 and $@ are the inner shell's
  local quiet=(bash -c 'trap "" "$0"; exec "$@"' "$REQUEUE_SIGNAL")

  # The job step up to the module it runs, the same for training and the preflight.
  local launch
  case $TOPOLOGY in
    torchrun)
      # One task per node holding all of the node's CPUs.
      launch=(srun --ntasks-per-node=1 --ntasks="$nodes" --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1
              "${quiet[@]}" "$PYTHON" -m ddp_mnist.commands.torchrun --nnodes="$nodes" --nproc-per-node="$per_node"
              --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$(job_port "$SLURM_JOB_ID")"
              --rdzv-id="$SLURM_JOB_ID" --max-restarts=0) ;;
    srun)
      # Not every SLURM version's srun takes --cpus-per-task over from sbatch: say it again.
      launch=(srun --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 "${quiet[@]}" "$PYTHON") ;;
    *)
      echo "TOPOLOGY=$TOPOLOGY is not a topology: use torchrun or srun" >&2
      return 2 ;;
  esac
  echo "ddp-mnist: SLURM job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), $TOPOLOGY topology," \
       "$nodes node(s) x $per_node rank(s), first node $MASTER_ADDR"
  if [[ ${PREFLIGHT:-0} == 1 ]]; then
    preflight "${launch[@]}" -m ddp_mnist doctor "${shared[@]}" || return
  fi
  rm -f "$run_dir/$REQUEUE_MARKER"  # left by an attempt that was killed before this script read it
  local before rc=0
  before=$(results_stamp "$run_dir")
  run_step "${launch[@]}" "${train[@]}" "$@" "${plan[@]}" || rc=$?
  job_outcome "$run_dir" "$before" "$rc"
}

# PREFLIGHT=1: the job step given as arguments, `ddp-mnist doctor` on every rank of the allocation as training
# will run, before training. Its report goes into the job log: a slow node or link, or a failed check, is named
# there, and its last line is the `sbatch --exclude=` line that leaves the node out. When doctor names one (or
# cannot run), the job ends here, with doctor's exit status.
preflight() {
  echo "ddp-mnist: preflight: ddp-mnist doctor on every rank, before training (PREFLIGHT=1)"
  local rc=0
  "$@" || rc=$?
  if (( rc != 0 )); then
    echo "ddp-mnist: preflight: doctor failed with exit status $rc (its report is above): not training;" \
         "submit again without the node it names (its last line: sbatch --exclude=...), or fix what it names" >&2
  fi
  return "$rc"
}

# results.json's modification time, or nothing.
results_stamp() {
  stat -c %y "$1/results.json" 2>/dev/null || true
}

# The job's outcome comes from the run folder, not from the step's exit status: under torchrun the step
# fails whenever the agent saw a signal, also one that came after the training was complete.
#   results.json written by this attempt: the training is complete -> exit 0, whatever the step said.
#   the requeue marker: the ranks stopped on the warning signal with a checkpoint -> requeue from here.
#   neither: the step's exit status.
# This job as SLURM's commands must name it: an element of a job array (sbatch --array) as ARRAY_TASK, since
# its own job id can be the array's, and `scontrol requeue` of that would requeue every element.
this_job() {
  if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    echo "$SLURM_JOB_ID"
  fi
}

job_outcome() {
  local run_dir=$1 before=$2 rc=$3 reason out
  if [[ $(results_stamp "$run_dir") != "$before" ]]; then
    if (( rc != 0 )); then echo "ddp-mnist: training complete ($run_dir/results.json); the job step's exit status $rc is ignored"; fi
    return 0
  fi
  if [[ -f $run_dir/$REQUEUE_MARKER ]]; then
    reason=$(<"$run_dir/$REQUEUE_MARKER")
    rm -f "$run_dir/$REQUEUE_MARKER"
    echo "ddp-mnist: the ranks stopped on $reason with a checkpoint: requeueing SLURM job $(this_job)"
    if ! out=$(scontrol requeue "$(this_job)" 2>&1); then
      echo "ddp-mnist: scontrol requeue $(this_job) failed: $out (resume with sbatch and the same RUN_DIR)" >&2
      return 1
    fi
    return 0
  fi
  return "$rc"
}

# Runs the job step and waits for it. `--signal=B:$REQUEUE_SIGNAL@N` signals only this shell: pass the
# signal to the step (srun forwards it to every process of its tasks), where the ranks checkpoint.
# A bash trap runs only between commands or inside `wait`, hence `&` and `wait`.
# SIGTERM (scancel, scontrol requeue, the time limit) needs no forwarding: SLURM signals the steps.
STEP_PID=
forward_warning() {
  echo "ddp-mnist: batch script got SIG$REQUEUE_SIGNAL, passing it to the ranks"
  if [[ -n $STEP_PID ]]; then kill -"$REQUEUE_SIGNAL" "$STEP_PID" 2>/dev/null || true; fi
}
run_step() {
  trap forward_warning "$REQUEUE_SIGNAL"
  "$@" &
  STEP_PID=$!
  local rc=0
  wait "$STEP_PID" || rc=$?
  while kill -0 "$STEP_PID" 2>/dev/null; do  # `wait` returned for the signal: the step still runs
    rc=0
    wait "$STEP_PID" || rc=$?
  done
  STEP_PID=
  return "$rc"
}

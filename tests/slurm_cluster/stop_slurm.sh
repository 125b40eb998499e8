#!/usr/bin/env bash
# Stop the cluster from start_slurm.sh by PID (a copy of ../shared/tools/slurm/stop_slurm.sh).
# Usage: stop_slurm.sh [--purge]  (--purge: rm state/log/run)
set -uo pipefail
PREFIX=${SLURM_PREFIX:-${TMPDIR:-/tmp}/slurm-ci}; rc=0
log() { echo "[stop_slurm $(date +%T)] $*"; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid() {  # name: pid file $PREFIX/run/<name>.pid, expected /proc/<pid>/comm == name
  local f=$PREFIX/run/$1.pid pid
  alive "$f" || { log "$1: not running"; rm -f "$f"; return 0; }
  pid=$(cat "$f")
  if [[ $(cat "/proc/$pid/comm" 2>/dev/null) != "$1" ]]; then log "$1: pid $pid is not $1, NOT killing"; rc=1; return 0; fi
  kill -TERM "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && { log "$1: sending SIGKILL"; kill -KILL "$pid"; }
  rm -f "$f"; log "$1: stopped pid $pid"
}

if alive "$PREFIX/run/slurmctld.pid"; then   # cancel jobs first so slurmd reaps the job steps
  mapfile -t jobs < <(squeue -h -o '%i' 2>/dev/null)
  if (( ${#jobs[@]} )); then
    log "cancelling jobs: ${jobs[*]}"; scancel "${jobs[@]}"
    for _ in $(seq 150); do [[ -z $(squeue -h -o '%i' 2>/dev/null) ]] && break; sleep 0.2; done
  fi
fi
stop_pid slurmd; stop_pid slurmctld; stop_pid munged

left=""
for p in /proc/[0-9]*; do [[ $(cat "$p/comm" 2>/dev/null) == slurmstepd ]] && left+="${p#/proc/} "; done
[[ -n $left ]] && { log "WARNING: slurmstepd still running: $left"; rc=1; }
if [[ ${1:-} == --purge ]]; then rm -rf "$PREFIX"/{state,log,run}; log "purged state/log/run"; fi
exit $rc

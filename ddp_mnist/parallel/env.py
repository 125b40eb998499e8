"""The launcher's environment, read in one place.

Every launcher (plain python, torchrun, accelerate, srun) only sets environment variables;
`DistEnv.from_environ()` reads them once and the rest of the package asks that object."""

from __future__ import annotations

import itertools
import os
import socket
from dataclasses import dataclass

from ddp_mnist.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Who this process is in the job, as the launcher said."""

    rank: int = 0
    """Global rank, 0..world_size-1."""
    local_rank: int = 0
    """Rank on this node; picks the GPU."""
    world_size: int = 1
    """Number of processes in the job."""
    local_world_size: int = 1
    """Processes on this node."""
    master_addr: str = "127.0.0.1"
    """Address of rank 0's TCP store."""
    master_port: int = 29500
    """Port of rank 0's TCP store."""
    launcher: str = "single"
    """`single`, `torchrun` (also accelerate), or `srun` (one SLURM task per rank)."""
    slurm_job_id: str | None = None
    """SLURM job id, when under SLURM."""
    restart_count: int = 0
    """How many times this job was restarted: SLURM requeues plus torchrun elastic restarts. Torchrun counts
    per node (agent) and not at all when a peer node's restart restarts this one: nodes can disagree, so
    the job decides with `job_round()`, never with this number alone."""
    run_id: str | None = None
    """torchrun's rendezvous id (--rdzv-id), shared by all nodes of the job; None without one (torchrun's
    default id, `none`, names no job)."""
    slurm_node: str | None = None
    """SLURM's name for this node (SLURMD_NODENAME), when under SLURM."""

    def job_ids(self) -> dict[str, str]:
        """The launchers' names for this job; a restart or a requeue of the job keeps them."""
        ids = {"slurm_job_id": self.slurm_job_id, "torchrun_run_id": self.run_id}
        return {key: value for key, value in ids.items() if value}

    @property
    def node(self) -> str:
        """This node's name: SLURM's (the name `sbatch --exclude` takes), else the host name."""
        return self.slurm_node or socket.gethostname()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launcher != "single"

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> DistEnv:
        env = os.environ if environ is None else environ
        slurm_job = env.get("SLURM_JOB_ID")
        slurm_node = env.get("SLURMD_NODENAME") or None
        restarts = _int(env, "SLURM_RESTART_COUNT", 0) + _int(env, "TORCHELASTIC_RESTART_COUNT", 0)
        run_id = env.get("TORCHELASTIC_RUN_ID") if env.get("TORCHELASTIC_RUN_ID") != "none" else None
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, accelerate launch, or a user's own export
            return cls(
                rank=_int(env, "RANK"),
                local_rank=_int(env, "LOCAL_RANK", 0),
                world_size=_int(env, "WORLD_SIZE"),
                local_world_size=_int(env, "LOCAL_WORLD_SIZE", _int(env, "WORLD_SIZE")),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=_int(env, "MASTER_PORT", 29500),
                launcher="torchrun",
                slurm_job_id=slurm_job,
                restart_count=restarts,
                run_id=run_id,
                slurm_node=slurm_node,
            )
        if "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:  # srun, one task per rank
            return cls(
                rank=_int(env, "SLURM_PROCID"),
                local_rank=_int(env, "SLURM_LOCALID", 0),
                world_size=_int(env, "SLURM_NTASKS"),
                local_world_size=_tasks_per_node(env),
                master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env),
                master_port=_int(env, "MASTER_PORT", slurm_port(slurm_job)),
                launcher="srun",
                slurm_job_id=slurm_job,
                restart_count=restarts,
                slurm_node=slurm_node,
            )
        return cls(slurm_job_id=slurm_job, restart_count=restarts, slurm_node=slurm_node)


def slurm_job_spec(environ) -> str | None:
    """This job as SLURM's commands must name it (`scontrol requeue`): an element of a job array as
    ARRAY_TASK, because its own job id can be the array's, which names every element; None outside SLURM.
    The same rule as slurm/lib.sh's this_job."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else environ.get("SLURM_JOB_ID") or None


def slurm_port(job_id: str | None) -> int:
    """A port derived from the job id, so two jobs sharing a node do not collide."""
    return 20000 + int(job_id) % 20000 if job_id and job_id.isdigit() else 29500


def _int(env, key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise ConfigError(f"environment variable {key} is not set; the launcher should set it")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None


def _tasks_per_node(env) -> int:
    """SLURM writes e.g. `2` or `2(x3)`; the leading number is this node's count."""
    digits = "".join(itertools.takewhile(str.isdigit, env.get("SLURM_NTASKS_PER_NODE", "")))
    return int(digits) if digits else _int(env, "SLURM_NTASKS")


def _first_slurm_host(env) -> str:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    if not nodes or any(c in nodes for c in "[,"):
        # A compressed list ("node[01-04]") needs `scontrol show hostnames`; the batch script exports it.
        raise ConfigError(
            "one-task-per-rank SLURM launch needs MASTER_ADDR: set it in the batch script "
            'to `scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1`'
        )
    return nodes

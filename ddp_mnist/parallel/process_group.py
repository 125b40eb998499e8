"""The process group's setup and teardown, and the restart round every rank agrees on."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddp_mnist.errors import ConfigError
from ddp_mnist.parallel.deadline import deadline
from ddp_mnist.parallel.device import gpu_identity, shared_gpus
from ddp_mnist.parallel.env import DistEnv


def check_nccl_gpus(store, env: DistEnv, device: torch.device, prefix: str, timeout_s: float) -> None:
    """NCCL refuses two ranks on one GPU ("Duplicate GPU detected") deep inside its first collective: say it
    before, with the fix. Each rank publishes its GPU's identity in the launcher's store and reads the others'."""
    store.set(f"{prefix}gpu-{env.rank}", gpu_identity(device))
    keys = [f"{prefix}gpu-{r}" for r in range(env.world_size)]
    store.wait(keys, datetime.timedelta(seconds=timeout_s))
    identities = {r: store.get(k).decode() for r, k in enumerate(keys)}
    shared = shared_gpus(identities)
    if shared:
        groups = "; ".join(f"ranks {', '.join(map(str, ranks))} on {identities[ranks[0]]}" for ranks in shared)
        raise ConfigError(
            f"NCCL cannot run two ranks on one GPU ({groups}); use --backend gloo to run several "
            f"ranks on one GPU, or start one rank per GPU"
        )


@dataclass(frozen=True)
class JobRound:
    """This start of the job's processes, as every rank agrees (see `agree_on_round`)."""

    generation: int = 1
    """1 for the first start of processes in the launcher's store; one more for each start after it."""
    restarts: int = 0
    """The highest restart count any rank's launcher reported (SLURM requeues plus torchrun restarts)."""

    @property
    def restarted(self) -> bool:
        """Processes of this job ran before this start: an elastic restart (the store counted an earlier start,
        or some node's agent counted a restart) or a SLURM requeue."""
        return self.generation > 1 or self.restarts > 0

    @property
    def prefix(self) -> str:
        """This start's namespace in the store: the keys of an earlier start (the dead group's addresses,
        its ranks' reports) are never read."""
        return f"ddp_mnist/gen-{self.generation}/"


_ROUND: JobRound | None = None  # the round of the process group this process is in (set by process_group)


def job_round(env: DistEnv) -> JobRound:
    """The round every rank agreed on; without a process group, this process's own launcher's word."""
    return _ROUND or JobRound(restarts=env.restart_count)


@contextlib.contextmanager
def process_group(env: DistEnv, backend: str, device: torch.device, timeout_s: float) -> Iterator[None]:
    """Join the job's process group (when there is one) and always leave it, also on errors."""
    global _ROUND
    if not env.distributed:
        yield
        return
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    # The timeout bounds every collective: a dead or stalled rank turns into an error, not a hang.
    timeout = datetime.timedelta(seconds=timeout_s)
    # The launcher's store (torchrun's agent, or rank 0). Torchrun keeps one store across elastic restarts,
    # so the group joins under this round's prefix: a restarted group must not read the addresses its dead
    # predecessor published there (it would connect to a dead rank; pytorch/pytorch#135712).
    with deadline(timeout_s, no_answer(env, timeout_s), status=2):
        store = rendezvous(env, timeout)
    _ROUND = agree_on_round(store, env, timeout_s)
    try:
        if backend == "nccl":
            check_nccl_gpus(store, env, device, _ROUND.prefix, timeout_s)
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(_ROUND.prefix + "group", store),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        yield
    finally:
        _ROUND = None
        # The trainer and its DDP wrapper are garbage by now but held in a reference cycle: free them while
        # the group they use still exists (freed after it, DDP's reducer could abort the process at exit).
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def rendezvous(env: DistEnv, timeout: datetime.timedelta) -> dist.Store:
    """The launcher's store: rank 0 (or torchrun's agent) serves it on MASTER_PORT, the others connect."""
    try:
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    except dist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise
        raise ConfigError(
            f"port {env.master_port} (MASTER_PORT) is in use by another program on {env.master_addr}, so rank 0 "
            f"cannot serve the job's store there; choose a free port (torchrun --master-port, or MASTER_PORT)"
        ) from None
    return store


def no_answer(env: DistEnv, timeout_s: float) -> str:
    """The join deadline's line. A store client that reached another program on MASTER_PORT waits for a
    handshake that never comes, and torch's own timeout does not end that wait. Rank 0 serves the store: it
    waited for ranks that did not come."""
    if env.rank == 0:
        return (
            f"ddp-mnist: error: rank 0 served the job's store at {env.master_addr}:{env.master_port}, but not every "
            f"one of the {env.world_size} ranks joined within {timeout_s:g} s (--timeout-s); check that every node "
            f"started its processes, with the same MASTER_ADDR and MASTER_PORT"
        )
    return (
        f"ddp-mnist: error: rank {env.rank} got no answer from the job's store at {env.master_addr}:"
        f"{env.master_port} within {timeout_s:g} s (--timeout-s): rank 0 (or torchrun's agent) is not serving it "
        f"there, or another program holds that port; check MASTER_ADDR and MASTER_PORT"
    )


def agree_on_round(store, env: DistEnv, timeout_s: float, poll_s: float = 0.01) -> JobRound:
    """Every rank learns the same generation, counted in the launcher's store, before any rank uses it.

    Nothing the launcher tells a worker is the same on every node after a torchrun restart (each agent
    counts its own restarts, and a restart caused by another node's failure counts nowhere), but the store
    is shared. Rank 0 opens a new generation. Each other rank asks under a number no earlier process of
    its rank used (its own counter in the store) and waits for rank 0's answer there, so it cannot read an
    answer meant for a dead process. Rank 0 answers the newest asker of each rank until each one confirmed
    in the new generation (keys no earlier process could have written). Processes of an earlier start are
    all gone when a new one starts: torchrun stops every node's workers before it rendezvouses again."""
    if env.rank != 0:
        asked = store.add(f"ddp_mnist/rank-{env.rank}/starts", 1)
        generation = int(store.get(f"ddp_mnist/rank-{env.rank}/start-{asked}"))  # waits up to the store's timeout
        store.set(f"ddp_mnist/gen-{generation}/joined-{env.rank}", str(env.restart_count))
        return JobRound(generation, int(store.get(f"ddp_mnist/gen-{generation}/restarts")))
    generation = store.add("ddp_mnist/generation", 1)
    joined = {r: f"ddp_mnist/gen-{generation}/joined-{r}" for r in range(1, env.world_size)}
    deadline = time.monotonic() + timeout_s
    restarts = env.restart_count
    while joined:
        for rank in list(joined):
            if store.check([joined[rank]]):
                restarts = max(restarts, int(store.get(joined.pop(rank))))
                continue
            asked = store.add(f"ddp_mnist/rank-{rank}/starts", 0)
            if asked:
                store.set(f"ddp_mnist/rank-{rank}/start-{asked}", str(generation))
        if joined and time.monotonic() > deadline:
            raise RuntimeError(
                f"rank(s) {', '.join(map(str, joined))} did not join the process group within "
                f"{timeout_s:g} s (--timeout-s); check that every node started its processes"
            )
        if joined:
            time.sleep(poll_s)
    store.set(f"ddp_mnist/gen-{generation}/restarts", str(restarts))
    return JobRound(generation, restarts)

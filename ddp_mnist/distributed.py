"""The launcher's environment, read in one place, and the process group's setup and teardown.

Every launcher (plain python, torchrun, accelerate, srun) only sets environment variables;
`DistEnv.from_environ()` reads them once and the rest of the package asks that object.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from .config import ConfigError

log = logging.getLogger("ddp_mnist")


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

    def job_ids(self) -> dict[str, str]:
        """The launchers' names for this job; a restart or a requeue of the job keeps them."""
        ids = {"slurm_job_id": self.slurm_job_id, "torchrun_run_id": self.run_id}
        return {key: value for key, value in ids.items() if value}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launcher != "single"

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> "DistEnv":
        env = os.environ if environ is None else environ
        slurm_job = env.get("SLURM_JOB_ID")
        restarts = _int(env, "SLURM_RESTART_COUNT", 0) + _int(env, "TORCHELASTIC_RESTART_COUNT", 0)
        run_id = env.get("TORCHELASTIC_RUN_ID") if env.get("TORCHELASTIC_RUN_ID") != "none" else None
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, accelerate launch, or a user's own export
            return cls(rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK", 0),
                       world_size=_int(env, "WORLD_SIZE"),
                       local_world_size=_int(env, "LOCAL_WORLD_SIZE", _int(env, "WORLD_SIZE")),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=_int(env, "MASTER_PORT", 29500), launcher="torchrun",
                       slurm_job_id=slurm_job, restart_count=restarts, run_id=run_id)
        if "SLURM_PROCID" in env and _int(env, "SLURM_NTASKS", 1) > 1:  # srun, one task per rank
            return cls(rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID", 0),
                       world_size=_int(env, "SLURM_NTASKS"),
                       local_world_size=_tasks_per_node(env),
                       master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env),
                       master_port=_int(env, "MASTER_PORT", slurm_port(slurm_job)), launcher="srun",
                       slurm_job_id=slurm_job, restart_count=restarts)
        return cls(slurm_job_id=slurm_job, restart_count=restarts)


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
        raise ConfigError("one-task-per-rank SLURM launch needs MASTER_ADDR: set it in the batch script "
                          "to `scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1`")
    return nodes


def pick_device(requested: str, env: DistEnv) -> torch.device:
    """This rank's CUDA device (`gpu_index`), or the CPU. Fails fast on impossible requests."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    index = gpu_index(env, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def gpu_index(env: DistEnv, visible: int) -> int:
    """Which of the `visible` GPUs this rank uses. Exactly one visible (SLURM `--gpus-per-task`, a per-rank
    CUDA_VISIBLE_DEVICES, or one GPU that several gloo ranks share): cuda:0, whatever the local rank.
    Several visible: the local rank's, which must exist."""
    if visible == 1:
        return 0
    if env.local_rank >= visible:
        raise ConfigError(f"local rank {env.local_rank} needs GPU {env.local_rank} but only {visible} GPU(s) are "
                          f"visible on this node; start at most {visible} processes per node, or give each rank "
                          f"its own GPU (SLURM --gpus-per-task=1, or one CUDA_VISIBLE_DEVICES per rank)")
    return env.local_rank


def gpu_identity(device: torch.device) -> str:
    """The physical GPU behind `device`, the same string in every process that uses it."""
    return f"{socket.gethostname()}/{torch.cuda.get_device_properties(device).uuid}"


def shared_gpus(identities: dict[int, str]) -> list[list[int]]:
    """Groups of ranks (two or more) that use the same physical GPU."""
    by_gpu: dict[str, list[int]] = {}
    for rank, gpu in sorted(identities.items()):
        by_gpu.setdefault(gpu, []).append(rank)
    return [ranks for ranks in by_gpu.values() if len(ranks) > 1]


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
        raise ConfigError(f"NCCL cannot run two ranks on one GPU ({groups}); use --backend gloo to run several "
                          f"ranks on one GPU, or start one rank per GPU")


def pick_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError("--backend nccl needs a CUDA GPU but this process runs on the CPU; "
                          "use --backend gloo (or auto)")
    return requested


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
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    _ROUND = agree_on_round(store, env, timeout_s)
    try:
        if backend == "nccl":
            check_nccl_gpus(store, env, device, _ROUND.prefix, timeout_s)
        dist.init_process_group(backend=backend, store=dist.PrefixStore(_ROUND.prefix + "group", store),
                                rank=env.rank, world_size=env.world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        yield
    finally:
        _ROUND = None
        # The trainer and its DDP wrapper are garbage by now but held in a reference cycle: free them while
        # the group they use still exists (freed after it, DDP's reducer could abort the process at exit).
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


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
            raise RuntimeError(f"rank(s) {', '.join(map(str, joined))} did not join the process group within "
                               f"{timeout_s:g} s (--timeout-s); check that every node started its processes")
        if joined:
            time.sleep(poll_s)
    store.set(f"ddp_mnist/gen-{generation}/restarts", str(restarts))
    return JobRound(generation, restarts)


def all_reduce(values: list[float], device: torch.device, ops: tuple[str, ...]) -> list[float]:
    """Reduce a few numbers over all ranks, each with its op (`sum` or `max`); float64 keeps counts exact.
    One collective per distinct op. A host-device sync."""
    out = list(values)
    for op in sorted(set(ops)):
        idx = [i for i, o in enumerate(ops) if o == op]
        tensor = torch.tensor([values[i] for i in idx], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        for i, v in zip(idx, tensor.tolist()):
            out[i] = v
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks."""
    return all_reduce(values, device, ops=("sum",) * len(values))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on at least one rank (one tiny all-reduce)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def is_main_rank() -> bool:
    """Rank 0 of the process group, or the only process when there is none."""
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_from_main(obj):
    """Rank 0's value of a small picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj) -> list | None:
    """Every rank's object, as a list on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if is_main_rank() else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a host-device sync; nothing to wait for on the CPU): before reading
    a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MainRankError(RuntimeError):
    """Rank 0 failed in work it did for every rank (`run_on_main`); raised on the other ranks."""


def run_on_main(fn, *args):
    """Run `fn` on rank 0 only; its (small, picklable) result reaches every rank in one broadcast, and so
    does its error, whatever its type (no rank left waiting). Rank 0 re-raises its own exception; the others
    raise ConfigError for a configuration error (the same clear message and exit status), else
    MainRankError naming rank 0's exception."""
    result, error = None, None
    if is_main_rank():
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - any error must reach the other ranks before it is raised
            error = e
    result, told = broadcast_from_main((result, None if error is None else (type(error).__name__, str(error))))
    if error is not None:
        raise error
    if told is not None:
        kind, message = told
        raise ConfigError(message) if kind == "ConfigError" else MainRankError(f"rank 0 failed: {kind}: {message}")
    return result


class PeerError(RuntimeError):
    """A collective failed because another rank died, stalled or failed. Says which rank and what it was doing."""


class RankReports:
    """Each rank's last word, kept in the job's TCP store, so that a rank whose collective failed can say
    which peer stopped answering and what that peer was doing.

    The train loop sets `phase` (a plain attribute write); a daemon thread publishes it with a counter
    every `interval` seconds. A thread, because a rank blocked in a collective keeps reporting while its
    main thread waits: the rank that died or was stopped is then the one whose counter stopped moving.
    The store is the launcher's (torchrun's agent, or rank 0's under srun), reached by its own client
    with a short timeout, so reading it after a failure cannot hang.

    The same thread is the watchdog (`timeout_s`): a peer whose counter has not moved for longer than the
    collective timeout (plus a margin) died or stalled. A collective would normally have failed by then;
    where none can (NCCL without async error handling, which a captured step needs, leaves the survivors
    blocked in a host read forever), the watchdog says which rank and what it was doing, in one line,
    and ends this process (exit 1). A peer that left cleanly says so first and is never blamed.
    """

    STALE_BEATS = 4  # a peer whose counter has not moved for this many intervals stopped answering
    WATCHDOG_MARGIN_S = 3.0  # after --timeout-s: a failing collective speaks first, with the same diagnosis

    def __init__(self, env: DistEnv, interval: float = 0.5, timeout_s: float | None = None, on_lost=None):
        self.env, self.interval = env, interval
        self.timeout_s = timeout_s  # None: no watchdog
        self.on_lost = on_lost or _end_process  # (for tests) what the watchdog does with its line
        self.phase = "starting"
        self.error: str | None = None
        self._store = None
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prefix = ""  # in this round's namespace, set on entering: torchrun's store outlives restarts
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (its beat, our monotonic time it last moved)
        self._watch_every = max(1, int((timeout_s or 0) / 10 / interval))  # beats between two watchdog checks

    def __enter__(self) -> "RankReports":
        if dist.is_initialized() and self.env.world_size > 1:
            self.start(f"{job_round(self.env).prefix}reports/rank-")
        return self

    def start(self, prefix: str) -> None:
        """Connect to the launcher's store, publish, and start the reporting (and watchdog) thread."""
        self._prefix = prefix
        try:
            self._store = dist.TCPStore(self.env.master_addr, self.env.master_port, is_master=False,
                                        timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
            self._publish()
        except (RuntimeError, ValueError) as e:  # reports are a diagnosis aid: never fail the job for them
            log.warning("rank reports disabled (store at %s:%d: %s)", self.env.master_addr,
                        self.env.master_port, e)
            self._store = None
            return
        self._thread = threading.Thread(target=self._beat, name="ddp-mnist-reports", daemon=True)
        self._thread.start()

    def __exit__(self, *exc) -> None:
        # Join before the process group (and its store) goes away: a thread still inside a store call
        # at interpreter exit can abort the process.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._store is not None and self.error is None:  # the peers' watchdogs must not blame a clean exit
            self.phase = "exited"
            self.publish()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._publish()
                # The watchdog reads every peer's report: N^2 store reads a beat in all, so it looks about ten
                # times per timeout (every beat for short timeouts), which is precise enough for its purpose.
                if self.timeout_s is not None and self._beats % self._watch_every == 0:
                    self.watch(self._read(), time.monotonic())
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending, nothing left to tell
                return

    def watch(self, reports: dict[int, dict | None], now: float) -> None:
        """The watchdog's check: a peer whose counter has not moved for longer than the timeout and the
        margin ends this process, with one line naming the peer and its last phase."""
        lost = []
        for rank, report in sorted(reports.items()):
            if report is None or (report["phase"] == "exited" and not report["error"]):
                continue
            beat, since = self._seen.get(rank, (None, now))
            if report["beat"] != beat:
                self._seen[rank] = (report["beat"], now)
            elif now - since > self.timeout_s + self.WATCHDOG_MARGIN_S:
                lost.append(_peer_problem(rank, report, silent_s=now - since))
        if lost:
            self.error = f"watchdog: {'; '.join(lost)}"[:300]
            self.publish()
            self.on_lost(f"ddp-mnist: rank {self.env.rank} ends (watchdog, --timeout-s {self.timeout_s:g}): "
                         f"{'; '.join(lost)}; this rank was in: {self.phase}")

    def publish(self) -> None:
        """Publish the current phase now (not at the next beat), when reports are on."""
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._publish()

    def _publish(self) -> None:
        self._beats += 1
        record = {"phase": self.phase, "error": self.error, "beat": self._beats, "time": time.time()}
        self._store.set(f"{self._prefix}{self.env.rank}", json.dumps(record))

    def _read(self) -> dict[int, dict | None]:
        keys = {r: f"{self._prefix}{r}" for r in range(self.env.world_size) if r != self.env.rank}
        return {r: json.loads(self._store.get(k)) if self._store.check([k]) else None for r, k in keys.items()}

    def explain(self, error: BaseException, blame_peers: bool = True) -> PeerError | None:
        """Tell the other ranks that this one failed and why; then, when `blame_peers`, look for peers
        that died, stalled or failed: a PeerError naming them and their last reports, or None."""
        if self._store is None:
            return None
        self.error = f"{type(error).__name__}: {error}"[:300]
        self.publish()
        if not blame_peers:
            return None
        try:
            reports = self._read()
            problems = self._problems(reports, time.time())
            if not problems:  # a peer that died just now still looks fresh: see whose counter stops moving
                time.sleep(self.STALE_BEATS * self.interval)
                earlier, reports = reports, self._read()
                problems = self._problems(reports, time.time(), earlier=earlier)
        except Exception as e:  # noqa: BLE001 - the store itself is gone (under srun rank 0 hosts it)
            problems = [f"the other ranks' reports cannot be read ({type(e).__name__}: {e}); the process "
                        f"hosting the store ({self.env.master_addr}:{self.env.master_port}) may have died"]
        if not problems:  # every peer is alive (maybe stuck, or waiting like this rank): show where they are
            log.warning("rank %d failed while every other rank still answers; their phases: %s", self.env.rank,
                        "; ".join(f"rank {r}: {report['phase']}" for r, report in sorted(reports.items())))
            return None
        peer_error = PeerError(f"{'; '.join(problems)}. (Rank {self.env.rank} saw: {self.error})")
        self.error = f"PeerError: {peer_error}"[:300]  # the others learn what this rank found
        self.publish()
        return peer_error

    def _problems(self, reports: dict[int, dict | None], now: float, earlier: dict | None = None) -> list[str]:
        problems = []
        for rank, report in sorted(reports.items()):
            if report is None:
                problems.append(f"rank {rank} never reported (it may not have started)")
            elif (report["error"] or now - report["time"] > self.STALE_BEATS * self.interval
                  or (earlier and earlier.get(rank) and earlier[rank]["beat"] == report["beat"])):
                problems.append(_peer_problem(rank, report, silent_s=now - report["time"]))
        return problems


def _peer_problem(rank: int, report: dict, silent_s: float) -> str:
    """What went wrong with a peer, from its last report: it failed (its error), or it went silent."""
    if report["error"]:
        return f"rank {rank} failed during {report['phase']}: {report['error']}"
    return f"rank {rank} stopped answering; its last report ({silent_s:.0f} s ago): {report['phase']}"


def record_error(error: BaseException) -> None:
    """Write `error` to torchrun's per-worker error file (TORCHELASTIC_ERROR_FILE, torch's elastic error
    handler), so that the launcher's failure summary names it instead of `error_file: <N/A>`. Call it inside
    the `except` block (the traceback is taken from there). Without torchrun: nothing."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(error)


def _end_process(line: str) -> None:
    """The watchdog's end: the main thread may be blocked for good (a collective, a host read), so the
    process ends from here, without unwinding it."""
    os.write(2, (line + "\n").encode())
    os._exit(1)

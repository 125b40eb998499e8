"""Ranks started from a fork server: the tests' fast way to launch `ddp-mnist` on N ranks.

`import torch` alone takes seconds per process, and torchrun pays it once for its agent and once per worker:
a 2-rank run of 5 steps took 9 s here, almost all of it imports. Like PyTorch's own distributed tests
(MultiProcessTestCase), most tests therefore start their ranks as real processes forked from one server that
imported torch and the package once, and give each rank the environment torchrun gives its workers. What
torchrun itself does (agents, rendezvous, restarts, its error file) is tested through real torchrun in
test_launchers, test_elastic, test_faults, test_multihost and test_slurm.

The server computes nothing before it forks (an OpenMP pool does not survive a fork); each rank sets its own
thread count from OMP_NUM_THREADS, as a fresh process would.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

# What a `ddp-mnist` run imports, loaded once in the server (never wandb: a test checks that a run without it
# never imports it).
PRELOAD = [
    "torch",
    "torch.distributed",
    "torch._dynamo",  # imported by the first optimizer a run builds (torch.optim's dynamo guard): 2.9 s here
    "ddp_mnist.commands.cli",
    "ddp_mnist.commands.arguments",
    "ddp_mnist.training.train",
    "ddp_mnist.training.trainer",
    "ddp_mnist.training.evaluation",
    "ranks",
]

CLONE_NEWNET, CLONE_NEWUTS = 0x40000000, 0x04000000  # <sched.h>

# Once one rank has failed, the others get SIGTERM, and SIGKILL this much later (torchrun's own stop).
FAILED_GROUP_GRACE_S = 30.0

_context: multiprocessing.context.BaseContext | None = None


def _server() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class OnHost:
    """A rank on a host of its own (tests/netns.py): its network namespace, the host name its process sees, and
    the variables that differ from one host to the next."""

    netns: str
    name: str
    env: dict[str, str]


def _rank_main(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str, host: OnHost | None) -> None:
    """One rank: the environment, working folder and output files of a fresh `python -m ddp_mnist ARGV`, and its
    host (when it has one of its own)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own stdout
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stdin = open(os.devnull)  # noqa: SIM115
    if host:
        _enter(host)  # after the output files: its error is the rank's
    sys.argv = [str(Path(__file__).resolve().parents[1] / "ddp_mnist" / "__main__.py"), *argv]
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    from ddp_mnist.commands.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, then status 1
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _enter(host: OnHost) -> None:
    """Join the host's network namespace and take its name in a UTS namespace of our own: what `ip netns exec
    NETNS unshare --uts` does before it starts a process, done by a forked one (Python 3.11 has no os.setns).
    Neither touches what the fork server loaded."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{host.netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) or libc.unshare(CLONE_NEWUTS):
            raise OSError(ctypes.get_errno(), f"cannot enter the network namespace of {host.name} ({host.netns})")
    finally:
        os.close(fd)
    socket.sethostname(host.name)


def rank_vars(rank: int, nproc: int, port: int) -> dict[str, str]:
    """What any launcher tells rank RANK of NPROC on this host (srun's tasks get these, set by hand)."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def torchrun_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """The variables torchrun --nproc_per_node=NPROC gives worker RANK on one node."""
    return {
        **rank_vars(rank, nproc, port),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "GROUP_WORLD_SIZE": "1",
        "ROLE_WORLD_SIZE": str(nproc),
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RUN_ID": "none",
    }


def run_ranks(
    argv: list[str],
    nproc: int,
    env: dict[str, str],
    cwd: Path,
    timeout: float,
    distributed: bool,
    hosts: list[OnHost] | None = None,
) -> subprocess.CompletedProcess:
    """`ddp-mnist ARGV` on NPROC ranks (one plain process when not DISTRIBUTED); with HOSTS, rank r on hosts[r].
    Returns what subprocess.run would: the status (for several ranks, torchrun's: 0 when every rank succeeded,
    else 1) and the ranks' stdout and stderr, rank by rank. Raises subprocess.TimeoutExpired after TIMEOUT
    seconds."""
    context = _server()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ddp-mnist-ranks-") as logs:
        ranks: list = []
        try:
            for rank in range(nproc):
                host = hosts[rank] if hosts else None
                rank_env = {
                    **env,
                    **(torchrun_env(rank, nproc, port) if distributed else {}),
                    **(host.env if host else {}),
                }
                out, err = f"{logs}/{rank}.out", f"{logs}/{rank}.err"
                process = context.Process(target=_rank_main, args=(argv, rank_env, str(cwd), out, err, host))
                process.start()
                ranks.append((process, out, err))
            codes = _wait(ranks, timeout, argv)
        except subprocess.TimeoutExpired as e:  # with what the ranks said, for the failure's report
            e.output, e.stderr = _outputs(ranks)
            raise
        except BaseException:  # an interrupted test: no rank outlives it
            _kill([process for process, _, _ in ranks])
            raise
        stdout, stderr = _outputs(ranks)
    returncode = codes[0] if len(set(codes)) == 1 else 1  # the ranks' one status (e.g. 75 on a stop), else 1
    return subprocess.CompletedProcess(["ddp-mnist", *argv], returncode, stdout, stderr)


def _outputs(ranks: list) -> tuple[str, str]:
    """The ranks' stdout and stderr, rank by rank."""
    return "".join(_read(out) for _, out, _ in ranks), "".join(_read(err) for _, _, err in ranks)


def _read(path: str) -> str:
    return Path(path).read_text(errors="replace") if Path(path).exists() else ""


def _wait(ranks: list, timeout: float, argv: list[str]) -> list[int]:
    """Waits for every rank. Once one has failed, the others are stopped as torchrun stops them: SIGTERM, then
    SIGKILL after FAILED_GROUP_GRACE_S."""
    deadline = time.monotonic() + timeout
    processes = [process for process, _, _ in ranks]
    kill_at = None
    while any(process.is_alive() for process in processes):
        now = time.monotonic()
        if now > deadline:
            _kill(processes)
            raise subprocess.TimeoutExpired(["ddp-mnist", *argv], timeout)
        if kill_at is None and any(process.exitcode not in (None, 0) for process in processes):
            kill_at = now + FAILED_GROUP_GRACE_S
            for process in processes:
                if process.is_alive():
                    process.terminate()
        if kill_at is not None and now > kill_at:
            _kill(processes)
            break
        multiprocessing.connection.wait([process.sentinel for process in processes if process.is_alive()], 0.5)
    return [process.exitcode for process in processes]


def _kill(processes: list) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.join()

"""Shared test helpers: the data setting, and real launches (python, torchrun) of the package.

Data: tests find MNIST through DDP_MNIST_DATA (a folder holding MNIST/raw/). In CI (CI=true) a test
that needs the data FAILS when it is missing; elsewhere it is skipped with a reason.
"""

from __future__ import annotations

import json
import multiprocessing.process
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from ranks import OnHost, free_port, rank_vars, run_ranks

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the fast subset
# `pytest -m "not process"` runs the tests that start no process (docs/testing.md). Every test that starts one
# (subprocess, multiprocessing; also through a fixture it uses) is marked `process`: an unmarked test that starts
# a process fails and says so, so the fast subset stays fast. DDP_MNIST_RECORD_PROCESSES=FILE lists them instead.
_RUNNING: list[pytest.Item] = []


def pytest_runtest_setup(item: pytest.Item) -> None:
    _RUNNING[:] = [item]


def pytest_runtest_teardown(item: pytest.Item) -> None:
    _RUNNING.clear()


def _started_a_process() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # a fixture's background thread (the SLURM jobs' signals): not the running test's doing
    item = _RUNNING[0] if _RUNNING else None
    if item is None or item.get_closest_marker("process"):
        return
    record = os.environ.get("DDP_MNIST_RECORD_PROCESSES")
    if record:
        with open(record, "a") as f:
            f.write(item.nodeid + "\n")
        return
    raise AssertionError(f"{item.nodeid} starts a process: mark it @pytest.mark.process (docs/testing.md)")


def _guard(method):
    def guarded(*args, **kwargs):
        _started_a_process()
        return method(*args, **kwargs)

    return guarded


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `early` run first: they start background work (the SLURM jobs) that later tests read."""
    items.sort(key=lambda item: item.get_closest_marker("early") is None)  # stable: otherwise file order


def pytest_configure(config: pytest.Config) -> None:
    _warm_matplotlib()
    subprocess.Popen._execute_child = _guard(subprocess.Popen._execute_child)  # type: ignore[attr-defined]
    multiprocessing.process.BaseProcess.start = _guard(multiprocessing.process.BaseProcess.start)  # type: ignore[method-assign]


def _warm_matplotlib() -> None:
    """On a fresh machine matplotlib's first import builds its font cache with a subprocess (fc-list): done here,
    before any test runs, so the first test that plots (`ddp-mnist report`) is not taken for one that starts a
    process, whichever test that is."""
    try:
        import matplotlib.font_manager  # noqa: F401
    except ImportError:
        pass  # the tests that plot skip


@pytest.fixture(scope="session")
def data_dir() -> Path:
    value = os.environ.get("DDP_MNIST_DATA")
    path = Path(value) if value else None
    if path is None or not (path / "MNIST" / "raw").is_dir():
        message = (
            "MNIST not found: set DDP_MNIST_DATA to a folder holding MNIST/raw/ "
            "(in this repository's CI: ../shared/data)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def base_env(data_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC", "SLURM_"))
    }
    # One OpenMP thread per process by default (several ranks share 2 cores); DDP_MNIST_TEST_THREADS=2 runs
    # the suite with another thread count, which changes the CPU kernels' summation order.
    threads = os.environ.get("DDP_MNIST_TEST_THREADS", "1")
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS=threads, PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    if data_dir is not None:
        env["DDP_MNIST_DATA"] = str(data_dir)
    env.update(extra)
    return env


def rank_env(data_dir: Path | None, rank: int, port: int, world_size: int = 2, **extra: str) -> dict[str, str]:
    """Rank RANK of a job on this host started by hand, as srun starts a task (no torchrun variables)."""
    return base_env(data_dir, **rank_vars(rank, world_size, port), **extra)


def run_cmd(
    cmd: list[str], env: dict[str, str], timeout: float = 300, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT)
    return checked(proc) if check else proc


def checked(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(proc.args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def ddp_mnist_cmd(nproc: int, *args: str, torchrun: bool = False) -> list[str]:
    """`python -m ddp_mnist ARGS` for one process, torchrun for several (or for one, with `torchrun`)."""
    if nproc == 1 and not torchrun:
        return [sys.executable, "-m", "ddp_mnist", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "ddp_mnist",
        *args,
    ]


def train_cmd(nproc: int, *args: str) -> list[str]:
    """`python -m ddp_mnist train ...` for one process, torchrun for several."""
    return ddp_mnist_cmd(nproc, "train", "--no-progress", *args)


def ddp_mnist(
    nproc: int,
    *args: str,
    env: dict[str, str],
    timeout: float = 300,
    check: bool = True,
    cwd: Path | None = None,
    torchrun: bool = False,
    hosts: list[OnHost] | None = None,
) -> subprocess.CompletedProcess:
    """`ddp-mnist ARGS` on NPROC ranks, each a real process forked from the tests' fork server (tests/ranks.py:
    no 3 s of imports per process), with HOSTS on hosts of their own (tests/netns.py); with `torchrun`, launched
    by torchrun itself, for what torchrun does."""
    if torchrun:
        proc = run_cmd(ddp_mnist_cmd(nproc, *args, torchrun=True), env, timeout=timeout, check=check, cwd=cwd)
    else:
        proc = run_ranks(list(args), nproc, env, cwd or ROOT, timeout, distributed=nproc > 1, hosts=hosts)
        proc = checked(proc) if check else proc
    return no_rank_named_slow(proc, env)


def no_rank_named_slow(proc: subprocess.CompletedProcess, env: dict[str, str]) -> subprocess.CompletedProcess:
    """No run of the suite names a slow rank unless a test slowed one (DDP_MNIST_FAULT slow=F): the slow-rank
    rule must not fire on the noise of a busy 2-core machine (training/stragglers.py)."""
    named = re.search(r"^epoch \d+/\d+ .*  slow: rank.*$", proc.stdout or "", re.MULTILINE)
    if named and "slow=" not in env.get("DDP_MNIST_FAULT", ""):
        pytest.fail(f"a rank was named slow in a run that slowed none: {named[0]}")
    return proc


def train(
    nproc: int,
    run_dir: Path,
    data_dir: Path,
    *args: str,
    timeout: float = 300,
    check: bool = True,
    torchrun: bool = False,
    **env: str,
) -> subprocess.CompletedProcess:
    """`ddp-mnist train --run-dir RUN_DIR ARGS` on NPROC ranks (see ddp_mnist)."""
    return ddp_mnist(
        nproc,
        *("train", "--no-progress", "--run-dir", str(run_dir), *args),
        env=base_env(data_dir, **env),
        timeout=timeout,
        check=check,
        torchrun=torchrun,
    )


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights in the newest checkpoint of a run folder."""
    newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(newest, map_location="cpu", weights_only=True)["model"]


def initial_weights(model: str = "mlp") -> dict[str, torch.Tensor]:
    """The weights every run with the default --seed starts from."""
    from ddp_mnist.model import build_model

    torch.manual_seed(0)
    return build_model(model).state_dict()


def parse(*argv: str):
    """The TrainConfig of `ddp-mnist train ARGV`, as the command line builds it."""
    from ddp_mnist.commands.arguments import config_from_args
    from ddp_mnist.commands.cli import build_parser

    return config_from_args(build_parser().parse_args(["train", *argv]))


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)

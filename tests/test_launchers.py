"""Every script in launch/ starts a real job on the CPU (gloo) and the job sees the right world size."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, base_env, free_port, results, run_cmd

pytestmark = pytest.mark.process  # every test here starts processes (docs/testing.md)

LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
SHORT = ("--recipe", "tutorial", "--max-steps", "10", "--no-progress")


def launch(script: str, run_dir: Path, data_dir: Path, timeout: float = 180, **env: str):
    return run_cmd(
        ["bash", str(LAUNCH / script), *SHORT, "--run-dir", str(run_dir)], base_env(data_dir, **env), timeout=timeout
    )


def test_scripts_pass_shellcheck():
    assert {p.name for p in SCRIPTS} >= {
        "single.sh",
        "torchrun_single_node.sh",
        "torchrun_multi_node.sh",
        "accelerate.sh",
    }
    if shutil.which("shellcheck") is None:
        message = "shellcheck is not installed (apt-get install shellcheck)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    proc = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_single(tmp_path, data_dir):
    launch("single.sh", tmp_path / "run", data_dir)
    res = results(tmp_path / "run")
    assert (res["world_size"], res["backend"], res["steps"]) == (1, "none", 10)


def test_torchrun_single_node(tmp_path, data_dir):
    launch("torchrun_single_node.sh", tmp_path / "run", data_dir, NPROC="2")
    res = results(tmp_path / "run")
    assert (res["world_size"], res["backend"], res["device"], res["nodes"]) == (2, "gloo", "cpu", 1)


def test_torchrun_multi_node_as_two_agents_on_localhost(tmp_path, data_dir):
    """Two torchrun agents, one 'node' each, meet through one c10d rendezvous on 127.0.0.1."""
    run_dir = tmp_path / "run"
    common = dict(
        NNODES="2",
        NPROC_PER_NODE="1",
        RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
        RDZV_ID=f"test-{os.getpid()}",
        LOCAL_ADDR="127.0.0.1",
    )
    cmd = ["bash", str(LAUNCH / "torchrun_multi_node.sh"), *SHORT, "--run-dir", str(run_dir)]
    agents = [
        subprocess.Popen(
            cmd,
            env=base_env(data_dir, NODE_RANK=str(rank), **common),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=180)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out[-4000:]
    res = results(run_dir)
    assert (res["world_size"], res["backend"]) == (2, "gloo")
    assert res["nodes"] == 2  # one process per node


def test_accelerate(tmp_path, data_dir):
    pytest.importorskip("accelerate")
    launch("accelerate.sh", tmp_path / "run", data_dir, NPROC="2")
    res = results(tmp_path / "run")
    # accelerate can silently start one process; the script passes --expected-world-size to catch that.
    assert (res["world_size"], res["backend"]) == (2, "gloo")


def test_the_multi_node_scripts_default_rendezvous_id_is_the_jobs_own():
    """Every job used to get the same default id (`ddp-mnist`): two unrelated jobs then looked like one job to
    anything that compares ids. The default is now the same on every node of a job (the same command) and
    differs between jobs; RDZV_ID and SLURM_JOB_ID still win."""

    def rdzv_id(*args: str, **env: str) -> str:
        """The --rdzv_id the script passes to torchrun (PYTHON=echo prints the command instead of running it)."""
        outer = {key: value for key, value in os.environ.items() if key != "SLURM_JOB_ID"}
        launch_env = {**outer, "PYTHON": "echo", "NNODES": "2", "NPROC_PER_NODE": "1"}
        launch_env.update({"RDZV_ENDPOINT": "node0:29400", **env})
        script = str(LAUNCH / "torchrun_multi_node.sh")
        out = subprocess.run(["bash", script, *args], env=launch_env, capture_output=True, text=True, check=True)
        return next(word.split("=", 1)[1] for word in out.stdout.split() if word.startswith("--rdzv_id="))

    job_a = rdzv_id("--run-dir", "/shared/runs/a")
    assert job_a.startswith("ddp-mnist-") and job_a == rdzv_id("--run-dir", "/shared/runs/a")  # every node
    assert job_a != rdzv_id("--run-dir", "/shared/runs/b")
    assert job_a != rdzv_id("--run-dir", "/shared/runs/a", RDZV_ENDPOINT="node7:29400")
    assert rdzv_id(RDZV_ID="mine") == "mine" and rdzv_id(SLURM_JOB_ID="77") == "77"

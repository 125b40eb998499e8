"""Elastic restarts across nodes: two torchrun agents ("nodes") meet through one c10d rendezvous, as
launch/torchrun_multi_node.sh runs them, and a worker of one agent only is killed.

Each agent counts its own restarts (TORCHELASTIC_RESTART_COUNT), and an agent whose workers were healthy
when the other agent restarted counts none: the nodes then disagree on that count. The job must still
agree on everything that matters: the namespace of the process group in torchrun's store, and whether it
resumes. It must end exactly where an uninterrupted run ends (plain SGD: difference 0.0, see test_faults).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import ROOT, base_env, final_model, free_port, max_param_diff, results
from test_faults import KEEP_ALL, RECIPE, STEPS, complete_steps, reference2, resumed_step, wait_until, workers

from ddp_mnist.artifacts.run_dir import RunDir, continues_job
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.errors import ConfigError
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.parallel.process_group import JobRound, agree_on_round

__all__ = ["reference2"]  # the uninterrupted 2-process run, a fixture shared with test_faults

TIMEOUT_S = "30"  # bounds each collective and store wait, so that a desynchronised job fails instead of hanging


def start_agent(node_rank: int, run_dir: Path, data_dir: Path, log: Path, rdzv: dict[str, str]) -> subprocess.Popen:
    """One agent of a two-node job (its own session: cleanup kills it with its workers)."""
    env = base_env(data_dir, NODE_RANK=str(node_rank), **rdzv)
    cmd = [
        "bash",
        str(ROOT / "launch" / "torchrun_multi_node.sh"),
        *RECIPE,
        *KEEP_ALL,
        "--no-progress",
        "--timeout-s",
        TIMEOUT_S,
        "--run-dir",
        str(run_dir),
    ]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.process
def test_killing_a_worker_of_one_node_restarts_the_job_in_step(reference2, tmp_path, data_dir):
    run = tmp_path / "run"
    rdzv = dict(
        NNODES="2",
        NPROC_PER_NODE="1",
        RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
        RDZV_ID=f"elastic-{os.getpid()}",
        LOCAL_ADDR="127.0.0.1",
        MAX_RESTARTS="1",
    )
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    agents = [start_agent(rank, run, data_dir, log, rdzv) for rank, log in enumerate(logs)]
    try:
        wait_until(lambda: 40 in complete_steps(run / "checkpoints"), agents[1], logs[1], 120, "step-40 checkpoint")
        newest_at_kill = complete_steps(run / "checkpoints")[-1]
        (worker,) = workers(agents[1].pid).values()  # the script execs torchrun: the agent is the bash process
        os.kill(worker, signal.SIGKILL)
        codes = [agent.wait(timeout=240) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait(timeout=30)
    output = "\n".join(f"--- node {rank}\n{log.read_text()[-4000:]}" for rank, log in enumerate(logs))
    assert codes == [0, 0], output
    # The job resumed on its own (no --resume), from the newest checkpoint, and finished the same trajectory.
    assert resumed_step(output) >= newest_at_kill
    assert results(run)["steps"] == STEPS
    assert max_param_diff(final_model(run), final_model(reference2)) == 0.0


# ------------------------------------------------------------------------------------------------
# The agreement itself, on a real TCP store shared by the "starts" of a job (threads stand for ranks)
# ------------------------------------------------------------------------------------------------
def start(store_port: int, world_size: int, restart_counts: dict[int, int]) -> dict[int, JobRound]:
    """One start of the job's ranks, all at once; each rank with its own agent's restart count."""
    rounds, errors = {}, []

    def rank(r: int) -> None:
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, wait_for_workers=False)
        try:
            rounds[r] = agree_on_round(
                store, DistEnv(rank=r, world_size=world_size, restart_count=restart_counts.get(r, 0)), timeout_s=20
            )
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return rounds


def test_every_start_agrees_on_one_new_generation_whatever_the_stale_keys():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    first = start(server.port, 3, {})
    assert set(first.values()) == {JobRound(generation=1, restarts=0)}
    # A start that died half-way: rank 2 asked for a generation and nobody answered (its rank 0 was gone).
    server.add("ddp_mnist/rank-2/starts", 1)
    # The next start: the nodes disagree on their restart counts (only node 1's agent counted one), and
    # every rank still lands in the same new generation, with the highest count.
    again = start(server.port, 3, {1: 1})
    assert set(again.values()) == {JobRound(generation=2, restarts=1)}
    assert again[0].restarted and again[0].prefix != first[0].prefix


def test_a_later_start_in_the_same_store_is_a_restart_even_when_no_agent_counted_one():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    assert not start(server.port, 2, {})[0].restarted
    assert set(start(server.port, 2, {}).values()) == {JobRound(generation=2, restarts=0)}


# ------------------------------------------------------------------------------------------------
# Resume without --resume: a restart or a requeue of the same job, never another job's folder
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def folder_of_job_7(tmp_path) -> RunDir:
    """A run folder in which SLURM job 7 (rendezvous id `rdzv-a`) wrote a checkpoint."""
    run = RunDir(tmp_path / "run")
    run.prepare(
        TrainConfig(run_dir=str(run.path)), resuming=False, job_ids={"slurm_job_id": "7", "torchrun_run_id": "rdzv-a"}
    )
    run.checkpoints.mkdir()
    (run.checkpoints / "step-00000020.pt").write_bytes(b"")
    return run


@pytest.mark.parametrize(
    "env, continues",
    [
        (DistEnv(slurm_job_id="7"), True),  # requeued: same SLURM job (SLURM_RESTART_COUNT aside)
        (DistEnv(run_id="rdzv-a"), True),  # restarted by torchrun, in a round where this node counted nothing
        (DistEnv(restart_count=1), True),  # this node's agent (or SLURM) counted a restart
        (DistEnv(slurm_job_id="8", run_id="rdzv-b"), False),  # another job reusing the folder
        (DistEnv(), False),
    ],
)
def test_a_start_continues_the_folders_job_only_when_it_is_that_job(folder_of_job_7, env, continues):
    assert continues_job(folder_of_job_7, env) is continues
    if not continues:  # today's error, and the folder keeps naming the job it holds
        with pytest.raises(ConfigError, match="already holds a training job"):
            folder_of_job_7.prepare(TrainConfig(run_dir=str(folder_of_job_7.path)), False, env.job_ids())
        assert folder_of_job_7.same_job({"slurm_job_id": "7"})


def test_a_restart_before_the_first_checkpoint_starts_afresh(tmp_path):
    assert not continues_job(RunDir(tmp_path / "empty"), DistEnv(restart_count=1))


def test_torchruns_default_rendezvous_id_names_no_job():
    env = DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"})
    assert env.job_ids() == {}
    assert DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job-a"}).job_ids() == {
        "torchrun_run_id": "job-a"
    }

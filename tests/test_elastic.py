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
from pathlib import Path

from conftest import ROOT, base_env, final_model, free_port, max_param_diff, results
from test_faults import KEEP_ALL, RECIPE, STEPS, complete_steps, reference2, resumed_step, wait_until, workers

__all__ = ["reference2"]  # the uninterrupted 2-process run, a fixture shared with test_faults

TIMEOUT_S = "30"  # bounds each collective and store wait, so that a desynchronised job fails instead of hanging


def start_agent(node_rank: int, run_dir: Path, data_dir: Path, log: Path, rdzv: dict[str, str]) -> subprocess.Popen:
    """One agent of a two-node job (its own session: cleanup kills it with its workers)."""
    env = base_env(data_dir, NODE_RANK=str(node_rank), **rdzv)
    cmd = ["bash", str(ROOT / "launch" / "torchrun_multi_node.sh"), *RECIPE, *KEEP_ALL, "--no-progress",
           "--timeout-s", TIMEOUT_S, "--run-dir", str(run_dir)]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_killing_a_worker_of_one_node_restarts_the_job_in_step(reference2, tmp_path, data_dir):
    run = tmp_path / "run"
    rdzv = dict(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
                RDZV_ID=f"elastic-{os.getpid()}", LOCAL_ADDR="127.0.0.1", MAX_RESTARTS="1")
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

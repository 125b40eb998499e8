"""Two hosts without SLURM: launch/torchrun_multi_node.sh on two "machines" joined by a network link.

The machines are two network namespaces on this machine, each with its own network stack, joined by a
bridge (198.18.0.1 and 198.18.0.2, an address range reserved for tests; tests/netns.py). One torchrun
agent runs in each, the agents meet in a c10d rendezvous on the first host, and gloo carries the
all-reduces over the link. The job must train exactly like the same job run as 2 processes on one node.
"""

from __future__ import annotations

import subprocess

import pytest
from conftest import ROOT, base_env, final_model, max_param_diff, results, train
from netns import bridged_hosts

pytestmark = pytest.mark.process  # every test here starts processes (docs/testing.md)

TRAIN = ("--recipe", "tutorial", "--max-steps", "100", "--seed", "2", "--no-progress")
SAME = ("test_accuracy", "test_loss", "test_samples", "steps", "world_size", "batch_size", "backend", "seed")


@pytest.fixture(scope="module")
def two_hosts():
    with bridged_hosts(2, tag="m") as made:
        yield made


def test_two_hosts_over_a_network_link_train_like_one_node(two_hosts, data_dir, tmp_path):
    a, b = two_hosts
    received_before = b.received_bytes()
    run_dir = tmp_path / "two_hosts"
    common = dict(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"{a.addr}:29400", RDZV_ID="two-hosts")
    agents = []
    for rank, host in enumerate(two_hosts):
        # Each agent is told its address (LOCAL_ADDR: its host name resolves to nothing), which one hosts the
        # rendezvous (NODE_RANK) and gloo which link to use.
        env = base_env(data_dir, NODE_RANK=str(rank), LOCAL_ADDR=host.addr, GLOO_SOCKET_IFNAME=host.link, **common)
        agents.append(
            subprocess.Popen(
                host.command(
                    "bash", str(ROOT / "launch" / "torchrun_multi_node.sh"), *TRAIN, "--run-dir", str(run_dir)
                ),
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        outputs = [agent.communicate(timeout=240)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out[-4000:]

    train(2, tmp_path / "one_node", data_dir, *TRAIN)
    res, ref = results(run_dir), results(tmp_path / "one_node")
    assert {k: res[k] for k in SAME} == {k: ref[k] for k in SAME}
    assert (res["world_size"], res["nodes"], res["backend"]) == (2, 2, "gloo")
    model = final_model(run_dir)
    assert max_param_diff(model, final_model(tmp_path / "one_node")) == 0.0
    # The gradients really crossed the link: a 2-rank all-reduce brings each rank about one model's
    # worth of bytes per step.
    grad_bytes = sum(t.numel() * t.element_size() for t in model.values())
    assert b.received_bytes() - received_before > 0.5 * res["steps"] * grad_bytes

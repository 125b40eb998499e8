"""`ddp-mnist doctor`: which node or link is slow (no process), and real runs: on one node, and on three hosts
on a bridge (tests/netns.py) with one host's link limited by a token bucket, which doctor must name, alone."""

from __future__ import annotations

import contextlib
import itertools
import subprocess

import pytest
from conftest import base_env, ddp_mnist
from netns import Host, bridged_hosts, one_rank_each

from ddp_mnist.commands.doctor import EXIT_FOUND, Measured, RankCheck, report
from ddp_mnist.scaling.node_links import link_bandwidths, node_leaders, round_robin
from ddp_mnist.scaling.slow_nodes import judge

MB = 1e6


# ---------------------------------------------------------------------- judging (no process)
def test_a_slow_node_is_named_by_its_fastest_link_also_when_most_links_are_slow():
    """Of three nodes with one slow, two of the three links are slow, and so is the median link."""
    verdict = judge(["a", "b", "c"], {("a", "b"): 900 * MB, ("a", "c"): 20 * MB, ("b", "c"): 25 * MB})
    assert (verdict.slow_nodes, verdict.slow_links, verdict.exclude()) == (["c"], [], ["c"])
    assert verdict.fastest == {"a": 900 * MB, "b": 900 * MB, "c": 25 * MB}


def test_noise_within_twice_the_median_names_nothing():
    nodes = ["a", "b", "c", "d"]
    links = {pair: (500 + 150 * i) * MB for i, pair in enumerate(itertools.combinations(nodes, 2))}
    verdict = judge(nodes, links)
    assert (verdict.slow_nodes, verdict.slow_links, verdict.exclude()) == ([], [], [])


def test_a_slow_link_between_healthy_nodes_is_named_and_one_of_its_nodes_left_out():
    nodes = ["a", "b", "c", "d"]
    links = {pair: 800 * MB for pair in itertools.combinations(nodes, 2)}
    links[("b", "c")] = 100 * MB
    verdict = judge(nodes, links)
    assert (verdict.slow_nodes, verdict.slow_links) == ([], [("b", "c")])
    assert verdict.exclude() == ["c"]  # on a tie, the later node: the first node hosts the rendezvous


def test_the_nodes_left_out_cover_every_slow_link_with_as_few_as_it_takes():
    nodes = ["a", "b", "c", "d", "e", "f"]
    links = {pair: 800 * MB for pair in itertools.combinations(nodes, 2)}
    for pair in (("a", "b"), ("b", "c"), ("b", "d"), ("e", "f")):
        links[pair] = 50 * MB
    verdict = judge(nodes, links)
    assert verdict.slow_nodes == []
    assert verdict.exclude() == ["b", "f"]


@pytest.mark.parametrize("nodes", [["a"], ["a", "b"]])
def test_one_or_two_nodes_have_nothing_to_compare(nodes):
    verdict = judge(nodes, {tuple(nodes): 1 * MB} if len(nodes) == 2 else {})
    assert (verdict.slow_nodes, verdict.slow_links, verdict.exclude()) == ([], [], [])


@pytest.mark.parametrize("count", range(1, 10))
def test_round_robin_meets_every_two_nodes_once_and_no_node_twice_a_round(count):
    rounds = round_robin(count)
    assert sorted(pair for pairs in rounds for pair in pairs) == list(itertools.combinations(range(count), 2))
    for pairs in rounds:
        members = [node for pair in pairs for node in pair]
        assert len(members) == len(set(members))
    assert len(rounds) == (count - 1 if count % 2 == 0 else count)


def test_links_are_named_by_their_nodes_from_each_leaders_fastest_round_trip():
    nodes = ["n1", "n1", "n2", "n2", "n3", "n3"]  # two ranks per node: the leaders are ranks 0, 2 and 4
    assert node_leaders(nodes) == [0, 2, 4]
    timed = [{(0, 2): [0.4, 0.2], (0, 1): [0.1]}, {}, {(1, 2): [0.5, 1.0]}, {}, {}, {}]
    assert link_bandwidths(timed, nodes, 10**6) == {("n1", "n2"): 2e7, ("n1", "n3"): 1e7, ("n2", "n3"): 4e6}


# ---------------------------------------------------------------------- the report (no process)
def measured(*problems: tuple[int, str]) -> Measured:
    checks = [RankCheck(rank, f"node{rank // 2 + 1}", "cpu", ()) for rank in range(6)]
    for rank, problem in problems:
        checks[rank] = RankCheck(rank, checks[rank].node, "cpu", (problem,))
    return Measured("gloo", 2**20, checks, {"seconds": 0.0709, "algbw_GBps": 0.0148, "busbw_GBps": 0.0246})


SLOW_NODE3 = {("node1", "node2"): 1105 * MB, ("node1", "node3"): 24 * MB, ("node2", "node3"): 23.6 * MB}


def test_the_report_names_the_slow_node_and_ends_with_the_line_to_paste():
    lines, status = report(measured(), SLOW_NODE3)
    assert status == EXIT_FOUND
    assert lines == [
        "ddp-mnist doctor: 3 node(s), 6 rank(s), backend gloo, messages of 1 MiB",
        "node   ranks  device   data  fastest link",
        "node1  0-1    2 x cpu  ok      1,105 MB/s",
        "node2  2-3    2 x cpu  ok      1,105 MB/s",
        "node3  4-5    2 x cpu  ok         24 MB/s  <- slow node",
        "link            bandwidth",
        "node1 - node2  1,105 MB/s",
        "node1 - node3     24 MB/s  <- slow node node3",
        "node2 - node3     24 MB/s  <- slow node node3",
        "all-reduce of 1 MiB over 6 ranks: 70.9 ms, algbw 15 MB/s, busbw 25 MB/s",
        "slow node: node3: its fastest link (24 MB/s) is 46x slower than the median node's fastest (1,105 MB/s)",
        "doctor: leave out 1 of 3 nodes:",
        "sbatch --exclude=node3",
    ]


def test_a_failed_check_is_named_with_its_rank_and_its_node_left_out():
    healthy = {pair: 900 * MB for pair in SLOW_NODE3}
    lines, status = report(measured((3, "data: MNIST not found: /x/MNIST/raw lacks ...")), healthy)
    assert status == EXIT_FOUND
    assert "node2 2-3 2 x cpu FAILED 900 MB/s <- failed a check".split() in [line.split() for line in lines]
    assert lines[-3:] == [
        "rank 3 (node node2): data: MNIST not found: /x/MNIST/raw lacks ...",
        "doctor: leave out 1 of 3 nodes:",
        "sbatch --exclude=node2",
    ]
    # The same problem on every node: leaving nodes out would not help, so no line says to.
    lines, status = report(measured(*((rank, "data: MNIST not found") for rank in range(6))), healthy)
    assert status == EXIT_FOUND and not any("--exclude" in line for line in lines)
    assert lines[-2:] == [
        "ranks 0-5 (nodes node1, node2, node3): data: MNIST not found",
        "every node has a problem (above): fix that, leaving nodes out would not help",
    ]


def test_the_report_of_a_healthy_job_says_so_last_and_exits_0():
    lines, status = report(measured(), {pair: 900 * MB for pair in SLOW_NODE3})
    assert status == 0 and not any("slow" in line and "no slow" not in line for line in lines)
    assert lines[-1] == (
        "no slow node or link among 3 nodes: every node's fastest link is within 2x of the median (900 MB/s), "
        "every link within 2x of the median link (900 MB/s)"
    )


# ---------------------------------------------------------------------- real runs
@pytest.mark.process
def test_on_one_node_doctor_runs_and_prints_the_all_reduce(data_dir):
    proc = ddp_mnist(2, "doctor", "--message-mib", "1", env=base_env(data_dir))
    lines = proc.stdout.splitlines()
    assert lines[0] == "ddp-mnist doctor: 1 node(s), 2 rank(s), backend gloo, messages of 1 MiB", proc.stdout
    assert lines[2].split()[1:5] == ["0-1", "2", "x", "cpu"] and lines[2].split()[5] == "ok", proc.stdout
    assert lines[3].startswith("all-reduce of 1 MiB over 2 ranks: ") and "busbw" in lines[3], proc.stdout
    assert lines[-1].startswith("one node (") and lines[-1].endswith("nothing to leave out"), proc.stdout


@pytest.mark.process
def test_data_missing_on_every_rank_is_one_line_naming_them_and_nothing_is_left_out(tmp_path):
    proc = ddp_mnist(2, "doctor", "--data-dir", str(tmp_path / "none"), env=base_env(), check=False)
    assert proc.returncode == EXIT_FOUND, proc.stdout + proc.stderr
    assert proc.stdout.count("data: MNIST not found") == 1, proc.stdout  # one line for both ranks
    assert "\nranks 0-1 (node " in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("every node has a problem"), proc.stdout


@pytest.fixture(scope="module")
def three_hosts():
    with bridged_hosts(3, tag="d") as made:
        yield made


@contextlib.contextmanager
def limited(host: Host, rate: str):
    host.limit(rate)
    try:
        yield
    finally:
        host.unlimit()


def doctor_on(hosts: list[Host], data_dir) -> subprocess.CompletedProcess:
    """`ddp-mnist doctor`, one rank on each host, as srun starts one task per rank. Messages of 1 MiB: a round
    trip over a link limited to 200 Mbit/s takes 0.1 s."""
    return ddp_mnist(
        len(hosts), "doctor", "--message-mib", "1", env=base_env(data_dir), hosts=one_rank_each(hosts), check=False
    )


@pytest.mark.process
def test_three_healthy_hosts_doctor_names_none(three_hosts, data_dir):
    proc = doctor_on(three_hosts, data_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ddp-mnist doctor: 3 node(s), 3 rank(s), backend gloo"), proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("no slow node or link among 3 nodes"), proc.stdout
    assert "--exclude" not in proc.stdout


@pytest.mark.process
def test_a_host_with_a_slow_link_is_named_alone(three_hosts, data_dir):
    slow = three_hosts[2]
    with limited(slow, "200mbit"):
        proc = doctor_on(three_hosts, data_dir)
    lines = proc.stdout.splitlines()
    assert proc.returncode == EXIT_FOUND and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    named = [line for line in lines if line.startswith("slow ")]
    assert len(named) == 1 and named[0].startswith(f"slow node: {slow.name}: "), proc.stdout
    assert lines[-1] == f"sbatch --exclude={slow.name}", proc.stdout

"""`ddp-mnist doctor`: which node or link is slow (no process)."""

from __future__ import annotations

import itertools

import pytest

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

"""Which node or link is slow, from the bandwidth of every link between two nodes (`ddp-mnist doctor`).

A node is slow when even its fastest link is more than SLOWER_THAN times slower than the median node's fastest
link. A slow node (its network card, cable or switch port) slows every link it is in, while a healthy node keeps
at least one fast link; judging nodes by their links' median instead would fail exactly where it matters most:
of three nodes with one slow, two of the three links are slow, and so is the median link. With the slow nodes
set aside, a link between two healthy nodes is slow when it is more than SLOWER_THAN times slower than the
median of those links. Medians, not means: one bad node or link cannot move the yardstick it is measured by.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

SLOWER_THAN = 2.0
"""How many times slower than the median a node or link must be to be named."""


Link = tuple[str, str]


@dataclass(frozen=True)
class Verdict:
    fastest: dict[str, float]
    """Each node's fastest link, bytes/s, in the job's order of nodes."""
    slow_nodes: list[str]
    slow_links: list[Link]
    """Links between two nodes that are not slow themselves."""
    node_median: float | None
    """The median of the nodes' fastest links (None with fewer than two nodes)."""
    link_median: float | None
    """The median of the links between nodes that are not slow (None when there is none)."""

    def exclude(self) -> list[str]:
        """The nodes to leave out so that no slow node or link remains: each slow node, and for the slow links
        the node in the most of them, again until none is left (on a tie, the later node: the job's first
        node, where its rendezvous runs, stays)."""
        order = list(self.fastest)
        left, chosen = list(self.slow_links), list(self.slow_nodes)
        while left:
            counts = Counter(node for link in left for node in link)
            node = max(counts, key=lambda n: (counts[n], order.index(n)))
            chosen.append(node)
            left = [link for link in left if node not in link]
        return sorted(chosen, key=order.index)


def judge(nodes: list[str], links: dict[Link, float]) -> Verdict:
    """The slow nodes and links among `links`, the bytes/s of each link between two of `nodes`."""
    fastest = {
        node: max((bandwidth for link, bandwidth in links.items() if node in link), default=0.0) for node in nodes
    }
    node_median = statistics.median(fastest.values()) if len(fastest) > 1 else None
    slow_nodes = [node for node, best in fastest.items() if node_median and best * SLOWER_THAN < node_median]
    healthy = {link: bandwidth for link, bandwidth in links.items() if not set(link) & set(slow_nodes)}
    link_median = statistics.median(healthy.values()) if healthy else None
    slow_links = [link for link, bandwidth in healthy.items() if link_median and bandwidth * SLOWER_THAN < link_median]
    return Verdict(fastest, slow_nodes, slow_links, node_median, link_median)

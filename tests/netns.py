"""Hosts on this machine for the tests: network namespaces joined by a bridge (test_multihost, test_doctor).

Each host is a network namespace, with its own network stack and an address from 198.18.0.0/15 (a range
reserved for tests: nobody's hosts), and one veth pair: one end inside the namespace, the other a port of a
bridge in this machine's own namespace, so that every host reaches every other one. `Host.command` runs a
process on a host, under the host's own name (a UTS namespace of its own), as on a machine of its own.
`Host.limit` slows the host's link both ways with a token bucket (tbf) on both ends of its pair: a qdisc limits
what leaves through its device, and netem, the usual tool, is not available on this machine kind
(../shared/notes: its kernel module is missing; tbf and htb work).

Needs root and `ip` (iproute2); elsewhere the tests skip, and in CI as root they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from ranks import OnHost

SUBNET = "198.18.0.{}/24"


@dataclass(frozen=True)
class Host:
    name: str
    """Its host name, as its processes see it."""
    netns: str
    link: str
    """Its end of its veth pair, inside its namespace: the interface gloo is told to use."""
    port: str
    """The other end: a port of the bridge."""
    addr: str

    def command(self, *argv: str) -> list[str]:
        """`argv` run on this host, under its own host name."""
        rename = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", rename, self.name, *argv]

    def received_bytes(self) -> int:
        """Bytes that came in over this host's link."""
        path = f"/sys/class/net/{self.link}/statistics/rx_bytes"
        return int(run("ip", "netns", "exec", self.netns, "cat", path))

    def limit(self, rate: str) -> None:
        """Slow this host's link to `rate` (tc's units: `200mbit`) both ways: each end limits what leaves it."""
        shape = ("qdisc", "add", "dev", "{}", "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")
        run("tc", "-n", self.netns, *(self.link if arg == "{}" else arg for arg in shape))
        run("tc", *(self.port if arg == "{}" else arg for arg in shape))

    def unlimit(self) -> None:
        run("tc", "-n", self.netns, "qdisc", "del", "dev", self.link, "root")
        run("tc", "qdisc", "del", "dev", self.port, "root")


def one_rank_each(hosts: list[Host]) -> list[OnHost]:
    """Rank r on hosts[r] (conftest.ddp_mnist's `hosts`), as srun starts one task per rank on each node: what
    differs from one host to the next, and rank 0's address (its store)."""
    return [
        OnHost(
            host.netns,
            host.name,
            {
                "MASTER_ADDR": hosts[0].addr,
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "1",
                "GROUP_RANK": str(rank),
                "GROUP_WORLD_SIZE": str(len(hosts)),
                "GLOO_SOCKET_IFNAME": host.link,
            },
        )
        for rank, host in enumerate(hosts)
    ]


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise OSError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


def require_root_and_ip() -> None:
    message = None
    if os.geteuid() != 0:
        message = "needs root to create network namespaces: run the tests as root (as `bash .ci/run` does)"
    elif shutil.which("ip") is None or shutil.which("tc") is None or shutil.which("unshare") is None:
        message = "needs `ip`, `tc` and `unshare`: apt-get install iproute2 util-linux"
    if message:
        pytest.fail(message) if os.environ.get("CI") and os.geteuid() == 0 else pytest.skip(message)


@contextlib.contextmanager
def bridged_hosts(count: int, tag: str) -> Iterator[list[Host]]:
    """COUNT hosts named node1, node2, ... on one bridge, at 198.18.0.1, .2, ...; all removed afterwards, also
    when setting them up failed half way. `tag` (one letter) keeps the names of two sets of hosts apart; the
    process id, those of two test processes."""
    require_root_and_ip()
    prefix = f"dd{tag}{os.getpid()}"  # interface names have at most 15 characters
    bridge = f"{prefix}b"
    made = [
        Host(f"node{i}", f"ddp-mnist-{prefix}-{i}", f"{prefix}h{i}", f"{prefix}p{i}", SUBNET.format(i).split("/")[0])
        for i in range(1, count + 1)
    ]
    try:
        run("ip", "link", "add", bridge, "type", "bridge")
        run("ip", "link", "set", bridge, "up")
        for i, host in enumerate(made, start=1):
            run("ip", "netns", "add", host.netns)
            run("ip", "link", "add", host.port, "type", "veth", "peer", "name", host.link)
            run("ip", "link", "set", host.port, "master", bridge)
            run("ip", "link", "set", host.port, "up")
            run("ip", "link", "set", host.link, "netns", host.netns)
            run("ip", "-n", host.netns, "addr", "add", SUBNET.format(i), "dev", host.link)
            run("ip", "-n", host.netns, "link", "set", host.link, "up")
            run("ip", "-n", host.netns, "link", "set", "lo", "up")
        yield made
    finally:
        for host in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", host.port], capture_output=True)  # a pair never moved
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)

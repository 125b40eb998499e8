"""Point-to-point bandwidth between every two nodes of a job, measured inside its ranks (`ddp-mnist doctor`).

Each node's first rank (its leader) exchanges a message with every other node's leader: the message goes
there and comes back, and the leader that sent it times the round trip. The pairs meet in rounds
(`round_robin`): no leader is in two pairs of one round, so the pairs of a round share no node and run at the
same time, and the rounds take N - 1 (N even) or N (N odd) exchanges for N nodes rather than N (N - 1) / 2.
The whole schedule runs `repeats` times after one untimed pass (connections, NCCL's communicators), and each
link's figure is its fastest round trip. Something that is not the link (a process waiting for a core, other
traffic) can only slow a round trip down, never speed it up, so the fastest one is the link's own speed; and
the passes spread a passing disturbance over different links instead of every round trip of one link. (On
this project's 2-core test machine under load, the median of 5 or 10 round trips once made a healthy node look
2.2x slower than the others; the fastest of 10 stayed within 1.4x.)
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ddp_mnist.parallel.collectives import barrier
from ddp_mnist.parallel.device import synchronize


def node_leaders(nodes: list[str]) -> list[int]:
    """The first rank of each node, in the order of those ranks; `nodes[r]` is rank r's node."""
    first: dict[str, int] = {}
    for rank, node in enumerate(nodes):
        first.setdefault(node, rank)
    return list(first.values())


def round_robin(count: int) -> list[list[tuple[int, int]]]:
    """Rounds of pairs (i < j) of 0..count-1 in which every two meet exactly once and nobody is in two pairs of
    one round: the circle method (the first stays, the others turn one place a round; with an odd count, a
    placeholder makes the number even, and whoever meets it sits the round out)."""
    seats: list[int | None] = [*range(count), *([None] if count % 2 else [])]
    half = len(seats) // 2
    rounds = []
    for _ in range(len(seats) - 1):
        pairs = zip(seats[:half], reversed(seats[half:]))
        rounds.append([(min(a, b), max(a, b)) for a, b in pairs if a is not None and b is not None])
        seats = [seats[0], seats[-1], *seats[1:-1]]
    return rounds


def time_links(leaders: list[int], rank: int, nbytes: int, device: torch.device, repeats: int) -> dict:
    """Every rank runs this, in step. Returns the round trips this rank timed, {(i, j): [seconds, ...]} for
    the node indices i < j where it leads node i (empty on every other rank). `device` holds the messages."""
    message = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    ping = torch.zeros(1, dtype=torch.float32, device=device)
    timed: dict[tuple[int, int], list[float]] = {}
    for timing in (False, *(True,) * repeats):
        for pairs in round_robin(len(leaders)):
            for i, j in pairs:
                if rank == leaders[i]:
                    seconds = round_trip(message, ping, leaders[j], device, starts=True)
                    if timing:
                        timed.setdefault((i, j), []).append(seconds)
                elif rank == leaders[j]:
                    round_trip(message, ping, leaders[i], device, starts=False)
            barrier()  # the next round starts together: no exchange overlaps one of the round before
    return timed


def round_trip(message: torch.Tensor, ping: torch.Tensor, peer: int, device: torch.device, starts: bool) -> float:
    """One exchange with `peer`: a tiny message there and back first, so that the timed part starts when both
    are ready (the clock would otherwise include the peer's arrival from the last barrier), then `message`
    there and back. The side that starts returns the seconds the message took; the other, 0."""
    if not starts:
        for tensor in (ping, message):
            dist.recv(tensor, peer)
            dist.send(tensor, peer)
        return 0.0
    dist.send(ping, peer)
    dist.recv(ping, peer)
    synchronize(device)
    started = time.perf_counter()
    dist.send(message, peer)
    dist.recv(message, peer)
    synchronize(device)
    return time.perf_counter() - started


def link_bandwidths(timed: list[dict], nodes: list[str], nbytes: int) -> dict[tuple[str, str], float]:
    """Bytes per second of each link, named by its two nodes (in the job's order of nodes), from every rank's
    `time_links`: the message's bytes both ways over the fastest round trip."""
    names = [nodes[rank] for rank in node_leaders(nodes)]
    seconds = {pair: times for mine in timed for pair, times in mine.items()}
    return {(names[i], names[j]): 2 * nbytes / min(seconds[(i, j)]) for i, j in sorted(seconds)}

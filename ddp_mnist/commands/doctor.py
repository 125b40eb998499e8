"""`ddp-mnist doctor`: find the bad node before the job starts.

Run it like training, under any launcher, on every rank of the allocation. Each rank checks its device (a small
computation with a known result) and its data (found and checked as training would); then the process group
forms, which is the third check, and the ranks measure the network: one all-reduce of the message size over
every rank (scaling/comm_bench.py), and a round trip between every two nodes (scaling/node_links.py). Rank 0
prints one table, names each slow node and link (scaling/slow_nodes.py) and each failed check, and ends with
the line to paste: `sbatch --exclude=NODE,...`. Rank 0's exit status: 0 when it names nothing, EXIT_FOUND
when it names a node, a link or a failed check, 2 when it cannot run (a clear error: a rank that never
joined, ...); the other ranks end with 0 when they could run.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass

import torch

from ddp_mnist.commands.arguments import add_rank_arguments, bounded, examples
from ddp_mnist.data.raw_files import prepare_mnist
from ddp_mnist.errors import DataError, first_line
from ddp_mnist.parallel.collectives import broadcast_from_main, gather_to_main
from ddp_mnist.parallel.device import pick_backend, pick_device
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.parallel.process_group import process_group
from ddp_mnist.scaling.comm_bench import time_all_reduce
from ddp_mnist.scaling.node_links import link_bandwidths, node_leaders, time_links
from ddp_mnist.scaling.slow_nodes import SLOWER_THAN, Verdict, judge

EXIT_FOUND = 1
"""The exit status when doctor names a node, a link or a failed check."""


def add_doctor_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Find the bad node before the job starts. Under the launcher a job would use, on every rank: checks "
        "each rank's device and data and that the process group forms, times an all-reduce over every rank "
        "and a round trip between every two nodes, and names each node or link more than "
        f"{SLOWER_THAN:g}x slower than the median, ending with the `sbatch --exclude=` line that leaves them "
        f"out. Exit status (rank 0's; the others end with 0): 0 when it names nothing, {EXIT_FOUND} when it names "
        "a node, link or failed check."
    )
    p.epilog = examples(
        "torchrun --nnodes=4 --nproc-per-node=8 ... -m ddp_mnist doctor",
        "srun --ntasks-per-node=8 ddp-mnist doctor                # one task per rank",
        "PREFLIGHT=1 sbatch --nodes=4 slurm/multi_node.sh ...     # doctor first, in the same job",
    )
    add_rank_arguments(p)  # --data-dir, --device, --backend: as `train` reads them
    p.add_argument(
        "--message-mib",
        type=bounded(float, 0.001, 1024),
        default=4.0,
        metavar="X",
        help="size of the all-reduce and of each node-to-node message, MiB",
    )
    p.add_argument(
        "--repeats",
        type=bounded(int, 1, 100),
        default=10,
        metavar="N",
        help="timed all-reduces (their mean is shown), and timed round trips per link (the fastest counts)",
    )
    p.add_argument(
        "--timeout-s",
        type=bounded(float, 1, 10**7),
        default=60.0,
        metavar="X",
        help="collective timeout in seconds (also how long rank 0 waits for the others to join)",
    )
    p.set_defaults(func=doctor_command)


@dataclass(frozen=True)
class RankCheck:
    """What one rank found before the group formed."""

    rank: int
    node: str
    device: str
    """`cpu`, or the GPU's name."""
    problems: tuple[str, ...]
    """Each failed check, in one line (`data: MNIST not found: ...`)."""


def doctor_command(args: argparse.Namespace) -> int:
    env = DistEnv.from_environ()
    device = pick_device(args.device, env)
    backend = pick_backend(args.backend, device)
    here = check_rank(env, device, args.data_dir)
    nbytes = int(args.message_mib * 2**20) // 4 * 4
    # gloo sends between two ranks from CPU tensors only (with --device cuda too); NCCL from the GPU.
    wire = device if backend == "nccl" else torch.device("cpu")
    with process_group(env, backend, device, args.timeout_s):
        checks = broadcast_from_main(gather_to_main(here))
        nodes = [check.node for check in checks]
        allreduce = time_all_reduce(nbytes, env.world_size, wire, args.repeats) if env.world_size > 1 else None
        timed = gather_to_main(time_links(node_leaders(nodes), env.rank, nbytes, wire, args.repeats))
    if not env.is_main:
        # Rank 0 alone reports and ends with the verdict's status: a rank that ended non-zero first would have
        # its launcher (torchrun, srun --kill-on-bad-exit) stop rank 0 before its report is out.
        return 0
    measured = Measured(backend if env.distributed else "none", nbytes, checks, allreduce)
    lines, status = report(measured, link_bandwidths(timed, nodes, nbytes))
    print("\n".join(lines), flush=True)
    return status


@dataclass(frozen=True)
class Measured:
    """What the ranks found, for the report (rank 0's)."""

    backend: str
    nbytes: int
    """The size of the all-reduce and of each node-to-node message."""
    checks: list[RankCheck]
    """Each rank's own checks, by rank."""
    allreduce: dict | None
    """`time_all_reduce`'s result; None on one rank."""


def check_rank(env: DistEnv, device: torch.device, data_dir: str | None) -> RankCheck:
    """This rank's device and data, checked before the group forms; a failure is reported, not raised, so that
    rank 0 names every failed check with its node."""
    problems = []
    x = torch.ones(64, 64, device=device)
    if (x @ x).sum().item() != 64**3:  # every partial sum is a small integer: exact in float32
        problems.append(f"device: {device} computed a wrong result for a known product; the device is faulty")
    try:
        prepare_mnist(data_dir)
    except DataError as e:
        problems.append(f"data: {first_line(e)}")
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return RankCheck(env.rank, env.node, name, tuple(problems))


# ---------------------------------------------------------------------------------------------- the report
def report(measured: Measured, links: dict) -> tuple[list[str], int]:
    """What rank 0 prints, and the exit status. The last line is the verdict: the `sbatch --exclude=` line
    whenever there is a node to leave out."""
    checks = measured.checks
    nodes = list(dict.fromkeys(check.node for check in checks))
    verdict = judge(nodes, links)
    failed = [check.node for check in checks if check.problems]
    lines = [
        f"ddp-mnist doctor: {len(nodes)} node(s), {len(checks)} rank(s), backend {measured.backend}, "
        f"messages of {_mib(measured.nbytes)}"
    ]
    lines += _node_table(checks, nodes, verdict, failed)
    if links:
        lines += _link_table(links, verdict)
    lines.append(_allreduce_line(measured.allreduce, measured.nbytes, len(checks)))
    lines += [f"slow node: {node}: {_slow_node(node, verdict)}" for node in verdict.slow_nodes]
    lines += [f"slow link: {a} - {b}: {_slow_link((a, b), links, verdict)}" for a, b in verdict.slow_links]
    lines += _problem_lines(checks)
    leave_out = sorted(set(verdict.exclude()) | set(failed), key=nodes.index)
    if not leave_out:
        return lines + [_all_well(nodes, verdict)], 0
    if len(leave_out) == len(nodes):
        return lines + ["every node has a problem (above): fix that, leaving nodes out would not help"], EXIT_FOUND
    count = f"{len(leave_out)} of {len(nodes)} nodes"
    return lines + [f"doctor: leave out {count}:", f"sbatch --exclude={','.join(leave_out)}"], EXIT_FOUND


def _node_table(checks: list[RankCheck], nodes: list[str], verdict: Verdict, failed: list[str]) -> list[str]:
    rows = [["node", "ranks", "device", "data", "fastest link", ""]]
    for node in nodes:
        mine = [check for check in checks if check.node == node]
        devices = Counter(check.device for check in mine)
        data_ok = not any(problem.startswith("data:") for check in mine for problem in check.problems)
        mark = "<- slow node" if node in verdict.slow_nodes else "<- failed a check" if node in failed else ""
        rows.append(
            [
                node,
                _spans([check.rank for check in mine]),
                ", ".join(name if n == 1 else f"{n} x {name}" for name, n in devices.items()),
                "ok" if data_ok else "FAILED",
                _rate(verdict.fastest[node]) if len(nodes) > 1 else "-",
                mark,
            ]
        )
    return _table(rows, right=4)


def _link_table(links: dict, verdict: Verdict) -> list[str]:
    rows = [["link", "bandwidth", ""]]
    for (a, b), bandwidth in links.items():
        slow_ends = [node for node in (a, b) if node in verdict.slow_nodes]
        mark = "<- slow link" if (a, b) in verdict.slow_links else f"<- slow node {slow_ends[0]}" if slow_ends else ""
        rows.append([f"{a} - {b}", _rate(bandwidth), mark])
    return _table(rows, right=1)


def _allreduce_line(allreduce: dict | None, nbytes: int, ranks: int) -> str:
    if allreduce is None:
        return "all-reduce: one rank, nothing to reduce"
    return (
        f"all-reduce of {_mib(nbytes)} over {ranks} ranks: {allreduce['seconds'] * 1e3:.1f} ms, "
        f"algbw {_rate(allreduce['algbw_GBps'] * 1e9)}, busbw {_rate(allreduce['busbw_GBps'] * 1e9)}"
    )


def _slow_node(node: str, verdict: Verdict) -> str:
    best, median = verdict.fastest[node], verdict.node_median
    return (
        f"its fastest link ({_rate(best)}) is {_times(median / best)} slower than the median node's fastest "
        f"({_rate(median)})"
    )


def _slow_link(link: tuple[str, str], links: dict, verdict: Verdict) -> str:
    median = verdict.link_median
    return f"{_rate(links[link])}, {_times(median / links[link])} slower than the median link ({_rate(median)})"


def _problem_lines(checks: list[RankCheck]) -> list[str]:
    """One line per failed check, with the ranks and nodes where it failed: `rank 3 (node node2): data: ...`,
    `ranks 0-15 (nodes node1, node2): data: ...` (a wrong --data-dir fails every rank alike)."""
    ranks: dict[str, list[RankCheck]] = {}
    for check in checks:
        for problem in check.problems:
            ranks.setdefault(problem, []).append(check)
    lines = []
    for problem, where in ranks.items():
        nodes = list(dict.fromkeys(check.node for check in where))
        who = f"rank {where[0].rank}" if len(where) == 1 else f"ranks {_spans([check.rank for check in where])}"
        lines.append(f"{who} ({'node' if len(nodes) == 1 else 'nodes'} {', '.join(nodes)}): {problem}")
    return lines


def _all_well(nodes: list[str], verdict: Verdict) -> str:
    if len(nodes) == 1:
        return f"one node ({nodes[0]}): no link between nodes to measure; nothing to leave out"
    if len(nodes) == 2:
        return "two nodes: one link, nothing to compare it with; nothing to leave out"
    return (
        f"no slow node or link among {len(nodes)} nodes: every node's fastest link is within {SLOWER_THAN:g}x of "
        f"the median ({_rate(verdict.node_median)}), every link within {SLOWER_THAN:g}x of the median link "
        f"({_rate(verdict.link_median)})"
    )


def _table(rows: list[list[str]], right: int) -> list[str]:
    """Columns two spaces apart; column `right` (the numbers) aligned right."""
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(width) if col == right else cell.ljust(width)
            for col, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]


def _spans(ranks: list[int]) -> str:
    """0, 1, 2, 3, 8 -> `0-3, 8`."""
    spans: list[list[int]] = []
    for rank in sorted(ranks):
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _rate(bytes_per_s: float) -> str:
    mb = bytes_per_s / 1e6
    return f"{mb:,.0f} MB/s" if mb >= 10 else f"{mb:.1f} MB/s"


def _times(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:g} MiB"

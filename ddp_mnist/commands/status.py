"""`ddp-mnist status RUN_DIR`: where each rank of a job is, from its heartbeat file (training/rank_files.py).

It reads files only (no process group, no launcher), so it works from any machine that sees the run folder,
while the job runs or after it: one line per rank (per node, with the outliers, for a big job), the rank
furthest behind, and every rank whose heartbeat is older than the job's --timeout-s. It exits 0 whenever it
can read the folder, whatever state the job is in.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from ddp_mnist.artifacts.config_sources import read_run_config
from ddp_mnist.commands.arguments import examples
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.errors import ConfigError
from ddp_mnist.training.rank_files import RANKS, read_heartbeats
from ddp_mnist.training.stragglers import slow_text

# Above this many ranks, one line per node, and one per rank only for the outliers.
RANK_LINES_UP_TO = 16


def status_lines(run: Path, now: float | None = None) -> list[str]:
    """What `ddp-mnist status` prints for RUN."""
    if not run.is_dir():
        raise ConfigError(f"{run} is not a folder; name a run folder (the --run-dir of a job)")
    now = time.time() if now is None else now
    timeout_s = _timeout_s(run)
    beats, problems = read_heartbeats(run)
    if not beats:
        return [f"{run}: no heartbeat files in {run / RANKS} (a job that has not started, or --heartbeat-s 0)"]
    newest = max(beat["step"] for beat in beats.values())
    silent = {rank for rank, beat in beats.items() if not beat.get("ended") and now - beat["written"] > timeout_s}
    behind = min(beats, key=lambda rank: (beats[rank]["step"], rank))
    lines = [f"{run}: {len(beats)} rank(s), newest step {newest}, heartbeats older than {timeout_s:g} s are silent"]
    if len(beats) <= RANK_LINES_UP_TO:
        lines += [_rank_line(beat, now, rank in silent) for rank, beat in sorted(beats.items())]
    else:
        lines += _node_lines(beats, now, silent)
        outliers = silent | {rank for rank, beat in beats.items() if beat["step"] < newest}
        lines += [_rank_line(beats[rank], now, rank in silent) for rank in sorted(outliers)]
    if beats[behind]["step"] < newest:
        lines.append(
            f"furthest behind: rank {behind} at step {beats[behind]['step']} ({newest - beats[behind]['step']} behind)"
        )
    if slow := _slow_ranks(beats):
        lines.append(f"slow (own work per step, over the median of the others): {slow}")
    if silent:
        lines.append(
            f"silent: {', '.join(f'rank {rank}' for rank in sorted(silent))} (no heartbeat for over {timeout_s:g} s)"
        )
    return lines + problems


def _slow_ranks(beats: dict[int, dict[str, Any]]) -> str:
    """Rank 0's latest verdict on slow ranks (stragglers.py), from its heartbeat; '' when none (or unreadable)."""
    named = beats.get(0, {}).get("slow_ranks")
    if not isinstance(named, dict):
        return ""
    valid = {k: v for k, v in named.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return slow_text({k: float(v) for k, v in valid.items() if math.isfinite(v)})


def _timeout_s(run: Path) -> float:
    try:
        value = read_run_config(run).get("timeout_s")
    except ConfigError:
        value = None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else TrainConfig.timeout_s


def _rank_line(beat: dict[str, Any], now: float, silent: bool) -> str:
    pace = []
    if (step_s := _number(beat.get("last_step_s"))) is not None:
        pace.append(f"{step_s * 1000:.1f} ms/step")
    if (rate := _number(beat.get("samples_per_s"))) is not None:
        pace.append(f"{rate:,.0f} samples/s")
    if (peak := _number(beat.get("peak_memory_bytes"))) is not None:
        pace.append(f"peak {peak / 2**20:,.0f} MiB")
    state = f"ended ({beat['ended']})" if beat.get("ended") else ("SILENT" if silent else "running")
    return (
        f"rank {beat['rank']} (node {beat.get('node', '?')}, local rank {beat.get('local_rank', '?')}): {state}, "
        f"step {beat['step']}, {beat.get('phase', '?')}{', ' if pace else ''}{', '.join(pace)}; "
        f"heartbeat {now - beat['written']:.0f} s ago"
    )


def _number(value: Any) -> float | None:
    """A finite number from a heartbeat, or None (absent, another type, too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _node_lines(beats: dict[int, dict[str, Any]], now: float, silent: set[int]) -> list[str]:
    nodes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for beat in beats.values():
        nodes[str(beat.get("node", "?"))].append(beat)
    lines = []
    for node, group in sorted(nodes.items()):
        steps = [beat["step"] for beat in group]
        quiet = sum(beat["rank"] in silent for beat in group)
        oldest = max(now - beat["written"] for beat in group)
        lines.append(
            f"node {node}: {len(group)} rank(s), steps {min(steps)}..{max(steps)}, oldest heartbeat {oldest:.0f} s ago"
            + (f", {quiet} silent" if quiet else "")
        )
    return lines


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Where each rank of a job is, from the heartbeat files its ranks keep in RUN_DIR/ranks/ (step, phase, "
        "pace, heartbeat age): the rank furthest behind, and the ranks silent for longer than the job's "
        "--timeout-s. Reads files only: run it from any machine that sees the folder, during the job or after."
    )
    p.epilog = examples("ddp-mnist status runs/latest", "watch -n 5 ddp-mnist status /shared/runs/big-job")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run folder (the job's --run-dir)")
    p.set_defaults(func=status_command)


def status_command(args: argparse.Namespace) -> int:
    print("\n".join(status_lines(args.run_dir)))
    return 0

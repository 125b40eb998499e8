"""A hung job's evidence, in `RUN/logs/hang-<time>/` (docs/debugging.md):

- `rank-N.txt`: the Python stack of each of rank N's threads, written by rank N when a hang is found, whatever
  its main thread is doing (a daemon thread writes it: the main thread may be blocked in a collective);
- `roll-call.txt`: written by the rank that found the hang first: each rank's last phase, step and heartbeat
  age, the silent ones marked, and the rank the others wait for.

A hang is found by a rank's watchdog or by a collective that timed out or failed (watchdog.py's `hang`); the
first rank to find it names the folder in the job's store, and every rank that can still run answers.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from ddp_mnist.files import write_text_atomic
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.parallel.watchdog import RankReports
from ddp_mnist.training.rank_files import LOGS, read_heartbeats

log = logging.getLogger("ddp_mnist")

STACKS_WAIT_S = 5.0  # how long the roll call waits for the ranks that still answer to write their stacks
ROLL_CALL = "roll-call.txt"


def stacks_path(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank}.txt"


class HangEvidence:
    """This rank's part of a hang's evidence (attached to the rank reports, which call `give`)."""

    def __init__(self, run: Path, env: DistEnv, reports: RankReports, heartbeat_s: float) -> None:
        self.run, self.env, self.reports, self.heartbeat_s = run, env, reports, heartbeat_s

    def give(self, folder_name: str, why: str | None) -> None:
        """Write this rank's stacks; when `why` is set (this rank found the hang first), also the roll call."""
        folder = self.run / LOGS / folder_name
        folder.mkdir(parents=True, exist_ok=True)
        header = f"rank {self.env.rank}, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
        stacks_path(folder, self.env.rank).write_text(f"{header}, phase: {self.reports.phase}\n\n{thread_stacks()}")
        if why is None:
            return
        self.wait_for_stacks(folder)
        lines = roll_call(self.reports.read_all(), read_heartbeats(self.run)[0], self, folder)
        write_text_atomic(folder / ROLL_CALL, f"{why}\n" + "\n".join(lines) + "\n")
        log.error("hang evidence: %s (%s)", folder, lines[-1])

    def wait_for_stacks(self, folder: Path) -> None:
        """Until every rank that still answers has written its stacks (bounded: the job is ending)."""
        deadline = time.monotonic() + STACKS_WAIT_S
        while time.monotonic() < deadline:
            reports, now = self.reports.read_all(), time.time()
            alive = [r for r, report in reports.items() if report and not _silent(self.reports, report, now)]
            if all(stacks_path(folder, rank).exists() for rank in alive):
                return
            time.sleep(0.1)


def thread_stacks() -> str:
    """The Python stack of every thread of this process, by name, the main thread first (where it is blocked or
    stuck: in a collective, a host read, a loop)."""
    frames = sys._current_frames()
    threads = sorted(threading.enumerate(), key=lambda t: t is not threading.main_thread())
    parts = []
    for thread in threads:
        frame = frames.get(thread.ident) if thread.ident is not None else None
        if frame is not None:
            stack = "".join(traceback.format_stack(frame))
            parts.append(f"thread {thread.name} (most recent call last):\n{stack}")
    return "\n".join(parts)


def _silent(reports: RankReports, report: dict[str, Any], now: float) -> bool:
    """A rank whose reporting thread stopped without an error: stopped or dead."""
    return reports.stale(report, now) and not report.get("error")


def roll_call(
    reports: dict[int, dict | None],
    beats: dict[int, dict[str, Any]],
    evidence: HangEvidence,
    folder: Path,
    now: float | None = None,
) -> list[str]:
    """One line per rank (its last phase, step, report and heartbeat ages, stacks or none), then the verdict.
    Without the store's reports (one process, or the store died), the heartbeat files' ages decide."""
    now = time.time() if now is None else now
    lines, silent, answering = [], [], {}
    for rank in range(evidence.env.world_size):
        report, beat = reports.get(rank), beats.get(rank)
        report_age = now - report["time"] if report else None
        beat_age = now - beat["written"] if beat else None
        if report:
            quiet = _silent(evidence.reports, report, now)
        else:
            quiet = beat_age is None or beat_age > 2 * evidence.heartbeat_s + 1
        phase = report["phase"] if report else (beat or {}).get("phase", "unknown")
        parts = [
            f"rank {rank}: {phase}",
            f"report {report_age:.1f} s ago" if report_age is not None else "no report",
            f"heartbeat {beat_age:.1f} s ago (step {beat['step']})" if beat else "no heartbeat file",
            f"error: {report['error'][:160]}" if report and report["error"] else None,
            stacks_path(folder, rank).name if stacks_path(folder, rank).exists() else "no stacks",
        ]
        lines.append(", ".join(p for p in parts if p) + (", SILENT" if quiet else ""))
        if quiet:
            silent.append(rank)
        elif report:
            answering[rank] = report
    return lines + [_verdict(silent, answering)]


def _verdict(silent: list[int], answering: dict[int, dict]) -> str:
    """Whom the others wait for: the silent ranks; else the rank that entered the fewest phases (every rank runs
    the same sequence, so it is behind: stuck outside the collective the others wait in)."""
    if silent:
        return f"silent: {', '.join(f'rank {r}' for r in silent)} (stopped or dead); the others wait for it"
    if not answering:
        return "no rank's report could be read (the store is gone)"
    fewest = min(report["moves"] for report in answering.values())
    behind = [r for r, report in answering.items() if report["moves"] == fewest]
    if len(behind) == len(answering):
        return "every rank answers and is at the same point: a collective that did not finish"
    where = "; ".join(f"rank {r}: {answering[r]['phase']}" for r in behind)
    return f"behind: {where} (the others are further on and wait for it)"

"""The rank reports and the watchdog: each rank publishes what it is doing, a rank whose peers stopped
answering ends itself with one line, and a failed collective names the peer that caused it."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from ddp_mnist.errors import PeerError
from ddp_mnist.parallel.deadline import end_process
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.parallel.process_group import job_round

log = logging.getLogger("ddp_mnist")


class RankReports:
    """Each rank's last word, kept in the job's TCP store, so that a rank whose collective failed can say
    which peer stopped answering and what that peer was doing.

    The train loop sets `phase` (a plain attribute write); a daemon thread publishes it with a counter
    every `interval` seconds. A thread, because a rank blocked in a collective keeps reporting while its
    main thread waits: the rank that died or was stopped is then the one whose counter stopped moving.
    The store is the launcher's (torchrun's agent, or rank 0's under srun), reached by its own client
    with a short timeout, so reading it after a failure cannot hang.

    The same thread is the watchdog (`timeout_s`): a peer whose counter has not moved for longer than the
    collective timeout (plus a margin) died or stalled. A collective would normally have failed by then;
    where none can (NCCL without async error handling, which a captured step needs, leaves the survivors
    blocked in a host read forever), the watchdog says which rank and what it was doing, in one line,
    and ends this process (exit 1). A peer that left cleanly says so first and is never blamed.
    """

    STALE_BEATS = 4  # a peer whose counter has not moved for this many intervals stopped answering
    WATCHDOG_MARGIN_S = 3.0  # after --timeout-s: a failing collective speaks first, with the same diagnosis

    def __init__(self, env: DistEnv, interval: float = 0.5, timeout_s: float | None = None, on_lost=None):
        self.env, self.interval = env, interval
        self.timeout_s = timeout_s  # None: no watchdog
        self.on_lost = on_lost or _end_process  # (for tests) what the watchdog does with its line
        self._phase, self.moves = "starting", 0
        self.error: str | None = None
        self._store: dist.TCPStore | None = None
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prefix = ""  # in this round's namespace, set on entering: torchrun's store outlives restarts
        self._hang_key = "hang"
        self._evidence: Callable[[str, str | None], None] | None = None  # attach_evidence()
        self._evidence_given = threading.Lock()  # held for good once this rank has given its evidence
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (its beat, our monotonic time it last moved)
        self._watch_every = max(1, int((timeout_s or 0) / 10 / interval))  # beats between two watchdog checks

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, text: str) -> None:
        """What this rank does now. Every rank runs the same sequence of phases, so `moves` (how many it has
        entered) orders the ranks of a hung job: the one with the fewest is the one the others wait for."""
        self._phase, self.moves = text, self.moves + 1

    def __enter__(self) -> RankReports:
        if dist.is_initialized() and self.env.world_size > 1:
            self.start(job_round(self.env).prefix)
        return self

    def start(self, namespace: str) -> None:
        """Connect to the launcher's store, publish, and start the reporting (and watchdog) thread."""
        self._prefix, self._hang_key = f"{namespace}reports/rank-", f"{namespace}hang"
        try:
            self._store = dist.TCPStore(
                self.env.master_addr,
                self.env.master_port,
                is_master=False,
                timeout=datetime.timedelta(seconds=10),
                wait_for_workers=False,
            )
            self._publish()
        except (RuntimeError, ValueError) as e:  # reports are a diagnosis aid: never fail the job for them
            log.warning("rank reports disabled (store at %s:%d: %s)", self.env.master_addr, self.env.master_port, e)
            self._store = None
            return
        self._thread = threading.Thread(target=self._beat, name="ddp-mnist-reports", daemon=True)
        self._thread.start()

    def __exit__(self, *exc) -> None:
        # Join before the process group (and its store) goes away: a thread still inside a store call
        # at interpreter exit can abort the process.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._store is not None and self.error is None:  # the peers' watchdogs must not blame a clean exit
            self.phase = "exited"
            self.publish()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._publish()
                self._answer_hang()
                # The watchdog reads every peer's report: N^2 store reads a beat in all, so it looks about ten
                # times per timeout (every beat for short timeouts), which is precise enough for its purpose.
                if self.timeout_s is not None and self._beats % self._watch_every == 0:
                    self.watch(self._read(), time.monotonic())
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending, nothing left to tell
                return

    def watch(self, reports: dict[int, dict | None], now: float) -> None:
        """The watchdog's check: a peer whose counter has not moved for longer than the timeout and the
        margin ends this process, with one line naming the peer and its last phase."""
        lost = []
        for rank, report in sorted(reports.items()):
            if report is None or (report["phase"] == "exited" and not report["error"]):
                continue
            beat, since = self._seen.get(rank, (None, now))
            if report["beat"] != beat:
                self._seen[rank] = (report["beat"], now)
            elif now - since > self.timeout_s + self.WATCHDOG_MARGIN_S:
                lost.append(_peer_problem(rank, report, silent_s=now - since))
        if lost:
            self.error = f"watchdog: {'; '.join(lost)}"[:300]
            self.publish()
            self.hang(f"rank {self.env.rank}'s watchdog: {'; '.join(lost)}")
            self.on_lost(
                f"ddp-mnist: rank {self.env.rank} ends (watchdog, --timeout-s {self.timeout_s:g}): "
                f"{'; '.join(lost)}; this rank was in: {self.phase}"
            )

    def publish(self) -> None:
        """Publish the current phase now (not at the next beat), when reports are on."""
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._publish()

    def _publish(self) -> None:
        self._beats += 1
        record = {
            "phase": self.phase,
            "moves": self.moves,
            "error": self.error,
            "beat": self._beats,
            "time": time.time(),
        }
        self._store.set(f"{self._prefix}{self.env.rank}", json.dumps(record))

    def _read(self, everyone: bool = False) -> dict[int, dict | None]:
        keys = {r: f"{self._prefix}{r}" for r in range(self.env.world_size) if everyone or r != self.env.rank}
        return {r: json.loads(self._store.get(k)) if self._store.check([k]) else None for r, k in keys.items()}

    def read_all(self) -> dict[int, dict | None]:
        """Every rank's last report (this one's too); empty without a store or when it cannot be read."""
        if self._store is None:
            return {}
        try:
            return self._read(everyone=True)
        except Exception:  # noqa: BLE001 - the store is gone with the process hosting it
            return {}

    # ------------------------------------------------------------------ a hang's evidence (training/hang_report.py)
    def attach_evidence(self, give: Callable[[str, str | None], None]) -> None:
        """`give(folder, why)` writes this rank's part of a hang's evidence into RUN/logs/FOLDER: its threads'
        stacks, and with `why` (this rank noticed first) the roll call. Once per process, on the first call."""
        self._evidence = give

    def hang(self, why: str) -> None:
        """This rank found the job hung (its watchdog fired, or a collective timed out or failed): agree on one
        evidence folder in the store (the first rank to get here names it), and give this rank's evidence.
        The other ranks see the folder's name at their next beat and give theirs."""
        if self._evidence is None or not self._evidence_given.acquire(blocking=False):  # never released: once
            return  # this rank gave its evidence already (a peer's folder, seen by the reporting thread)
        # Unique to this rank: two ranks that time out in the same second must not both think they were first.
        proposal = f"hang-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-rank{self.env.rank}"
        folder = proposal
        if self._store is not None:
            with contextlib.suppress(Exception):  # the store is gone: this rank's own folder, all it can do
                folder = self._store.compare_set(self._hang_key, "", proposal).decode()
        self._write_evidence(folder, why if folder == proposal else None)

    def _answer_hang(self) -> None:
        """At each beat: a peer named a hang's folder, so this rank (whatever its main thread does) gives its
        stacks. One store check a beat, and only once a hang's evidence is wanted."""
        if self._evidence is not None and not self._evidence_given.locked() and self._store.check([self._hang_key]):
            if self._evidence_given.acquire(blocking=False):  # never released: once
                self._write_evidence(self._store.get(self._hang_key).decode(), None)

    def _write_evidence(self, folder: str, why: str | None) -> None:
        try:
            self._evidence(folder, why)
        except Exception as e:  # noqa: BLE001 - evidence is a diagnosis aid: never the reason a job ends
            log.warning("hang evidence not written: %s", e)

    def explain(self, error: BaseException, blame_peers: bool = True) -> PeerError | None:
        """Tell the other ranks that this one failed and why; then, when `blame_peers`, look for peers
        that died, stalled or failed: a PeerError naming them and their last reports, or None."""
        if self._store is None:
            return None
        self.error = f"{type(error).__name__}: {error}"[:300]
        self.publish()
        if not blame_peers:
            return None
        try:
            reports = self._read()
            problems = self._problems(reports, time.time())
            if not problems:  # a peer that died just now still looks fresh: see whose counter stops moving
                time.sleep(self.STALE_BEATS * self.interval)
                earlier, reports = reports, self._read()
                problems = self._problems(reports, time.time(), earlier=earlier)
        except Exception as e:  # noqa: BLE001 - the store itself is gone (under srun rank 0 hosts it)
            problems = [
                f"the other ranks' reports cannot be read ({type(e).__name__}: {e}); the process "
                f"hosting the store ({self.env.master_addr}:{self.env.master_port}) may have died"
            ]
        if not problems:  # every peer is alive (maybe stuck, or waiting like this rank): show where they are
            log.warning(
                "rank %d failed while every other rank still answers; their phases: %s",
                self.env.rank,
                "; ".join(f"rank {r}: {report['phase']}" for r, report in sorted(reports.items())),
            )
            return None
        peer_error = PeerError(f"{'; '.join(problems)}. (Rank {self.env.rank} saw: {self.error})")
        self.error = f"PeerError: {peer_error}"[:300]  # the others learn what this rank found
        self.publish()
        return peer_error

    def stale(self, report: dict, now: float) -> bool:
        """A report older than STALE_BEATS intervals: its rank's reporting thread stopped (stopped or dead)."""
        return now - report["time"] > self.STALE_BEATS * self.interval

    def _problems(self, reports: dict[int, dict | None], now: float, earlier: dict | None = None) -> list[str]:
        problems = []
        for rank, report in sorted(reports.items()):
            if report is None:
                problems.append(f"rank {rank} never reported (it may not have started)")
            elif (
                report["error"]
                or self.stale(report, now)
                or (earlier and earlier.get(rank) and earlier[rank]["beat"] == report["beat"])
            ):
                problems.append(_peer_problem(rank, report, silent_s=now - report["time"]))
        return problems


def _peer_problem(rank: int, report: dict, silent_s: float) -> str:
    """What went wrong with a peer, from its last report: it failed (its error), or it went silent."""
    if report["error"]:
        return f"rank {rank} failed during {report['phase']}: {report['error']}"
    return f"rank {rank} stopped answering; its last report ({silent_s:.0f} s ago): {report['phase']}"


def record_error(error: BaseException) -> None:
    """Write `error` to torchrun's per-worker error file (TORCHELASTIC_ERROR_FILE, torch's elastic error
    handler), so that the launcher's failure summary names it instead of `error_file: <N/A>`. Call it inside
    the `except` block (the traceback is taken from there). Without torchrun: nothing."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(error)


def _end_process(line: str) -> None:
    """The watchdog's end: the main thread may be blocked for good (a collective, a host read)."""
    end_process(line, 1)

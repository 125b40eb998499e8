"""Stop signals on real training processes: a signal is a flag acted on at a step boundary (checkpoint,
exit 75); the same signal twice within a moment is still one request. Where no step boundary comes, a stop
still acts within seconds: at once before the first step (the rendezvous), after STOP_GRACE_S in a hung
collective. The clock rules themselves (the repeat window, the grace) are checked with a given clock.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import base_env, free_port, rank_env, train_cmd

from ddp_mnist.training import signals as signals_module
from ddp_mnist.training.signals import EXIT_PREEMPTED, REPEAT_WINDOW_S, STOP_GRACE_S, StopSignals, TrainingStopped

LINE_TIMEOUT_S = 120


class Proc:
    """`python -m ddp_mnist train ...` whose output lines are read as they come (stdout and stderr)."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.popen = subprocess.Popen(
            train_cmd(1, *args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str) -> str:
        """The first output line holding `text` (fails if the process ends or goes quiet first)."""
        while True:
            try:
                line = self.lines.get(timeout=LINE_TIMEOUT_S)
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"no line with {text!r}; output:\n" + "\n".join(self.seen[-40:]))
            self.seen.append(line)
            if text in line:
                return line

    def finish(self) -> tuple[int, str]:
        rc = self.popen.wait(timeout=LINE_TIMEOUT_S)
        while (line := self.lines.get(timeout=LINE_TIMEOUT_S)) is not None:
            self.seen.append(line)
        return rc, "\n".join(self.seen)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.mark.process
def test_the_same_signal_twice_at_once_is_one_request_a_checkpoint(data_dir, tmp_path):
    """SLURM signals every process of a step and torchrun forwards the signal too: both arrive together."""
    proc = Proc(
        [
            "--run-dir",
            str(tmp_path / "run"),
            "--recipe",
            "tutorial",
            "--max-steps",
            "50",
            "--seed",
            "1",
            "--pause-at-step",
            "5",
        ],
        base_env(data_dir),
    )
    try:
        proc.wait_for("paused at step 5")
        proc.popen.send_signal(signal.SIGTERM)
        proc.popen.send_signal(signal.SIGTERM)
        rc, out = proc.finish()
    finally:
        proc.kill()
    assert rc == EXIT_PREEMPTED, out
    assert "SIGTERM received: checkpointing at step 5, then stopping" in out
    assert (tmp_path / "run" / "checkpoints" / "step-00000005.pt").exists()
    assert "without a checkpoint" not in out


@pytest.mark.process
def test_a_stop_signal_ends_a_hung_rendezvous_at_once(data_dir, tmp_path):
    """Rank 0 of 2 waits in the rendezvous for a rank that never comes (--timeout-s 600): one SIGTERM ends it
    at once, as a clean stop (no step has run, nothing is lost)."""
    port = free_port()
    proc = Proc(["--run-dir", str(tmp_path / "run"), *RECIPE, "--timeout-s", "600"], rank_env(data_dir, 0, port))
    try:
        wait_until_listening(port, proc)  # rank 0 hosts the rendezvous store: it is waiting there now
        proc.popen.send_signal(signal.SIGTERM)
        rc, out = proc.finish()
    finally:
        proc.kill()
    assert rc == EXIT_PREEMPTED, out
    assert out.splitlines()[-1].startswith("ddp-mnist: SIGTERM received before the first step: stopping now"), out


@pytest.mark.process
def test_a_stop_signal_ends_a_hung_collective_within_its_grace(data_dir, tmp_path):
    """Rank 1 hangs after step 3, so rank 0 waits in a collective that would time out only after 600 s: a
    SIGTERM to both ends both within STOP_GRACE_S, without a checkpoint, each saying why."""
    port = free_port()
    job = ["--run-dir", str(tmp_path / "run"), *RECIPE, "--timeout-s", "600"]
    ranks = [Proc(job, rank_env(data_dir, rank, port, DDP_MNIST_FAULT="hang:step=3:rank=1")) for rank in (0, 1)]
    try:
        ranks[1].wait_for("ddp-mnist: test fault: hang at step 3 on rank 1")
        for proc in ranks:
            proc.popen.send_signal(signal.SIGTERM)
        ended = [proc.finish() for proc in ranks]  # each within LINE_TIMEOUT_S, far below the 600 s
    finally:
        for proc in ranks:
            proc.kill()
    for rc, out in ended:
        assert rc == 128 + signal.SIGTERM, out
        assert f"ddp-mnist: SIGTERM received and no step boundary came within {STOP_GRACE_S:g} s" in out, out
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*.pt"))


RECIPE = ("--recipe", "tutorial", "--device", "cpu")


def wait_until_listening(port: int, proc: Proc) -> None:
    deadline = time.monotonic() + LINE_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.popen.poll() is None, proc.finish()[1]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"rank 0 never listened on port {port}")


# ------------------------------------------------------------------------------------------------
# The clock rules, with a given clock (no process, no waiting)
# ------------------------------------------------------------------------------------------------
class Ended(Exception):
    pass


@pytest.fixture
def endings(monkeypatch) -> list[tuple[str, int]]:
    """Where StopSignals would end the process, the line and status are recorded and Ended is raised."""
    ended: list[tuple[str, int]] = []

    def end_process(line: str, status: int):
        ended.append((line, status))
        raise Ended

    monkeypatch.setattr(signals_module, "end_process", end_process)
    return ended


def test_before_the_first_step_a_stop_ends_the_process_at_once(endings):
    seen = []
    signals = StopSignals(on_abort=seen.append)
    with pytest.raises(Ended):
        signals._arrived(signal.SIGUSR1, now=100.0)
    assert seen == [signal.SIGUSR1]  # the requeue marker's chance (train.py: requeue_marker)
    assert endings[0][1] == EXIT_PREEMPTED and "SIGUSR1 received before the first step" in endings[0][0]


def test_a_repeat_within_the_window_is_one_request_a_later_one_an_abort(endings):
    signals = StopSignals(talk=False)
    signals.stepping()
    signals._arrived(signal.SIGTERM, now=100.0)
    signals._arrived(signal.SIGTERM, now=100.0 + REPEAT_WINDOW_S / 2)  # SLURM and torchrun, together
    assert signals.pending and not endings
    with pytest.raises(Ended):
        signals._arrived(signal.SIGTERM, now=100.0 + REPEAT_WINDOW_S)
    assert endings == [("ddp-mnist: SIGTERM received again: stopping now, without a checkpoint", 143)]


def test_a_stop_no_step_boundary_takes_up_ends_after_the_grace(endings, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(signals_module.time, "monotonic", lambda: clock[0])
    marked = []
    signals = StopSignals(talk=False, on_abort=marked.append)
    signals.stepping()
    assert signals._wait_s() is None  # no stop: no deadline
    signals._arrived(signal.SIGUSR1, now=clock[0])
    clock[0] += STOP_GRACE_S / 2
    assert signals._wait_s() == STOP_GRACE_S / 2
    signals._grace_over()  # woken early: nothing happens
    signals.stepping()  # the loop is still making steps (a long --stop-check-every): the grace runs from here
    clock[0] += STOP_GRACE_S * 0.9
    signals._grace_over()
    assert not endings and signals._wait_s() == pytest.approx(STOP_GRACE_S * 0.1)
    clock[0] += STOP_GRACE_S * 0.1
    with pytest.raises(Ended):
        signals._grace_over()
    assert endings[0][1] == 128 + signal.SIGUSR1 and "no step boundary came within" in endings[0][0]
    assert marked == [signal.SIGUSR1]  # under SLURM, the requeue marker
    signals.settled()  # the loop took it up: the checkpoint may take its time
    assert signals._wait_s() is None
    signals._grace_over()
    assert len(endings) == 1


def test_a_failing_abort_hook_still_ends_the_process(endings):
    def full_disk(sig):
        raise OSError(28, "No space left on device")

    signals = StopSignals(talk=False, on_abort=full_disk)
    with pytest.raises(Ended):
        signals._arrived(signal.SIGTERM, now=1.0)
    assert endings[0][1] == EXIT_PREEMPTED


def test_a_stop_after_the_last_step_waits_for_the_end(endings):
    """A resumed run at its last step makes no step: settled() at the loop's end, and a stop then lets the final
    evaluation and results.json finish instead of ending the process."""
    signals = StopSignals(talk=False)
    signals.settled()
    signals._arrived(signal.SIGTERM, now=1.0)
    assert signals.pending and not endings and signals._wait_s() is None


def test_after_a_clean_stop_a_launchers_sigterm_no_longer_kills_the_rank():
    """torchrun SIGTERMs the other workers once a first one exits 75: a rank still finishing its own stop (rank 0's
    W&B finish, the run folder's release) must end with 75 too, not die by the signal (seen: [-15, 75]). After a
    clean stop the handlers stay recording; after any other ending they are given back."""
    default = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(TrainingStopped):
            with StopSignals(talk=False) as stopped:
                stopped.settled()
                raise TrainingStopped("SIGUSR1", True, "step-00000001.pt")
        signal.raise_signal(signal.SIGTERM)  # before the fix: the test process itself died here
        assert stopped.received == signal.SIGTERM
        signal.signal(signal.SIGTERM, default)
        with pytest.raises(ValueError), StopSignals(talk=False):
            raise ValueError("not a stop")
        assert signal.getsignal(signal.SIGTERM) == default
    finally:
        signal.signal(signal.SIGTERM, default)


@pytest.mark.process
def test_a_requeue_says_what_scontrol_did_also_when_slurm_ends_it(tmp_path, monkeypatch, capsys):
    """Launched without the batch scripts, rank 0 runs `scontrol requeue`. SLURM, requeueing the job, ends its
    processes, scontrol too when it has not exited yet: a fresh-clone CI logged `requeue ...: failed: ` (no
    reason) for a requeue that happened. Ended by a signal, it requested the requeue; a real failure says how."""
    from ddp_mnist.commands.cli import after_stop

    stub = tmp_path / "scontrol"
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    for var in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_JOB_ID", "DDP_MNIST_SCRIPT_REQUEUES"):
        monkeypatch.delenv(var, raising=False)
    stop = TrainingStopped("SIGUSR1", requeue=True, checkpoint=tmp_path / "step-1.pt")
    for script, said in [
        ("exit 0", "requested"),
        ("kill -TERM $$", "requested (scontrol was ended by signal 15, as SLURM ends a requeued job's processes)"),
        ("exit 1", "failed (scontrol exited 1): it printed no reason"),
        ("echo 'Invalid job id specified' >&2; exit 1", "failed (scontrol exited 1): Invalid job id specified"),
    ]:
        stub.write_text(f"#!/bin/sh\n{script}\n")
        stub.chmod(0o755)
        assert after_stop(stop) == EXIT_PREEMPTED
        assert capsys.readouterr().out == f"ddp-mnist: requeue of SLURM job 42: {said}\n"

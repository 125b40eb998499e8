"""Stop signals on a real training process: a signal is a flag acted on at a step boundary (checkpoint,
exit 75); the same signal twice within a moment is still one request; a second SIGINT or SIGTERM a few
seconds after the first ends the process at once, also where no step boundary comes (the rendezvous).
"""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import base_env, free_port, train_cmd

from ddp_mnist.training.signals import EXIT_PREEMPTED, REPEAT_WINDOW_S

pytestmark = pytest.mark.process  # every test here starts processes (docs/testing.md)

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


def test_a_second_sigint_ends_a_hung_rendezvous_at_once(data_dir, tmp_path):
    """Rank 0 of 2 waits in the rendezvous for a rank that never comes: no step boundary will come."""
    port = free_port()
    env = base_env(
        data_dir,
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    proc = Proc(["--run-dir", str(tmp_path / "run"), "--recipe", "tutorial", "--device", "cpu"], env)
    try:
        wait_until_listening(port, proc)  # rank 0 hosts the rendezvous store: it is waiting there now
        proc.popen.send_signal(signal.SIGINT)
        proc.wait_for("SIGINT received: stopping at the next step with a checkpoint")
        time.sleep(REPEAT_WINDOW_S)  # the rule under test: a repeat after this long is an abort
        proc.popen.send_signal(signal.SIGINT)
        rc, out = proc.finish()
    finally:
        proc.kill()
    assert rc == 128 + signal.SIGINT, out
    assert out.splitlines()[-1] == "ddp-mnist: SIGINT received again: stopping now, without a checkpoint", out


def wait_until_listening(port: int, proc: Proc) -> None:
    deadline = time.monotonic() + LINE_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.popen.poll() is None, proc.finish()[1]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"rank 0 never listened on port {port}")

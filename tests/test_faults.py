"""Faults the training job survives, each injected into real processes (torchrun on gloo, real files):
a worker killed under an elastic restart, the checkpoint writer killed mid-save, damaged checkpoints,
a rank that stalls, and a loss that turns NaN or overflows in fp16.

Parameter comparisons are exact (difference 0.0): the tutorial recipe is plain SGD and a resumed run
continues the same trajectory bit for bit (docs/design.md, Damaged checkpoints), so an interrupted job must
end exactly where an uninterrupted one ends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, base_env, final_model, free_port, max_param_diff, results, train

from ddp_mnist.artifacts.checkpoint import Checkpointer
from ddp_mnist.errors import CheckpointError

STEPS = 120
RECIPE = ("--recipe", "tutorial", "--max-steps", str(STEPS), "--checkpoint-every", "20")
KEEP_ALL = ("--keep-checkpoints", "10")  # the reference keeps every checkpoint: damage tests copy them
SHORT_STEPS = 40  # the writer-kill test: one process, a checkpoint at every step


# ------------------------------------------------------------------------------------------------
# Real processes in the background, and what /proc says about them
# ------------------------------------------------------------------------------------------------
def launch(
    nproc: int, run_dir: Path, data_dir: Path, log: Path, *args: str, restarts: int = 0, fault: str | None = None
) -> subprocess.Popen:
    """Start a run without waiting: plain python for 1 process, torchrun for more. Output goes to `log`.
    Its own session, so that cleanup can kill torchrun and every worker at once. `fault`: a
    DDP_MNIST_FAULT (ddp_mnist/parallel/faults.py): a rank stops or dies at an exact step or inside a save."""
    train_args = ["-m", "ddp_mnist", "train", "--no-progress", "--run-dir", str(run_dir), *args]
    if nproc == 1:
        cmd = [sys.executable, *train_args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            f"--max-restarts={restarts}",
            *train_args,
        ]
    with open(log, "w") as out:
        env = base_env(data_dir, **({"DDP_MNIST_FAULT": fault} if fault else {}))
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def kill_all(proc: subprocess.Popen) -> None:
    """Cleanup: SIGKILL the launcher and all its workers (stopped ones too)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def workers(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the worker processes a torchrun process started (its children, RANK in their environment)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0") if parent == launcher_pid else []
        except OSError:  # exited meanwhile
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(proc.name)
    return found


def wait_until(condition, proc: subprocess.Popen, log: Path, timeout: float, what: str, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(poll)


def complete_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints (a .pt beside its JSON) in a checkpoints folder, oldest first."""
    return complete_steps_in(os.listdir(folder)) if folder.exists() else []


def complete_steps_in(names: list[str]) -> list[int]:
    """The same, in a listing of such a folder (taken at some moment)."""
    return sorted(
        int(n[5:13]) for n in names if n.startswith("step-") and n.endswith(".json") and n[:-5] + ".pt" in names
    )


def resumed_step(output: str) -> int:
    match = re.search(r"resumed from \S*step-(\d+)\.pt", output)
    assert match, f"no 'resumed from' line in the output:\n{output[-3000:]}"
    return int(match[1])


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):  # inside the tensor data: the archive still opens
        data[i] ^= 0xFF
    path.write_bytes(data)


# ------------------------------------------------------------------------------------------------
# Uninterrupted references: the faulted runs must end with exactly their parameters
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference2(tmp_path_factory, data_dir) -> Path:
    run = tmp_path_factory.mktemp("reference2") / "run"
    train(2, run, data_dir, *RECIPE, *KEEP_ALL)
    return run


@pytest.fixture(scope="module")
def reference1(tmp_path_factory, data_dir) -> Path:
    run = tmp_path_factory.mktemp("reference1") / "run"
    train(1, run, data_dir, "--recipe", "tutorial", "--max-steps", str(SHORT_STEPS))
    return run


# ------------------------------------------------------------------------------------------------
# Elastic restart: torchrun restarts the group and the job resumes by itself
# ------------------------------------------------------------------------------------------------
@pytest.mark.process
def test_elastic_restart_after_a_worker_is_killed(reference2, tmp_path, data_dir):
    """Rank 1 dies (SIGKILL) right after step 50, mid-epoch, between the checkpoints of steps 40 and 60."""
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    proc = launch(2, run, data_dir, log, *RECIPE, *KEEP_ALL, restarts=1, fault="kill:step=50:rank=1")
    try:
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_all(proc)
    output = log.read_text()
    # The survivor said which rank died; the agent restarted the group once; the job resumed on its own
    # (no --resume) from the newest checkpoint, so it lost at most --checkpoint-every steps.
    assert "rank 1 stopped answering" in output, output[-3000:]
    assert results(run)["restarts"] == 1
    assert resumed_step(output) == 40
    assert results(run)["steps"] == STEPS
    assert max_param_diff(final_model(run), final_model(reference2)) == 0.0


# ------------------------------------------------------------------------------------------------
# Crash-safe checkpoints
# ------------------------------------------------------------------------------------------------
@pytest.mark.process
def test_writer_killed_during_checkpoint_writes(reference1, tmp_path, data_dir):
    """SIGKILL the writer inside a checkpoint save, at two moments: with the .pt of step 12 complete in its
    temporary file but not renamed, then (resumed) with the .pt of step 25 renamed but its JSON not written.
    Each --resume continues from the newest complete checkpoint, and the job ends with the reference
    parameters."""
    run, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = (
        "--recipe",
        "tutorial",
        "--max-steps",
        str(SHORT_STEPS),
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        "2",
    )
    left_behind = []
    for attempt, fault in enumerate(("kill:save-pt=12", "kill:save-json=25")):
        log = tmp_path / f"attempt-{attempt}.log"
        proc = launch(1, run, data_dir, log, *args, *(("--resume",) if attempt else ()), fault=fault)
        try:
            assert proc.wait(timeout=120) == -signal.SIGKILL, log.read_text()[-3000:]
        finally:
            kill_all(proc)
        left_behind.append(sorted(os.listdir(folder)))
        if attempt:
            assert resumed_step(log.read_text()) == 11  # the newest complete checkpoint was intact
    # What the kills left: a temporary file beside the two newest complete checkpoints; a .pt without its JSON.
    assert [n for n in left_behind[0] if n.endswith(".tmp")] and complete_steps_in(left_behind[0]) == [10, 11]
    assert "step-00000025.pt" in left_behind[1] and "step-00000025.json" not in left_behind[1]
    final = train(1, run, data_dir, *args, "--resume")
    assert resumed_step(final.stdout) == 24
    assert max_param_diff(final_model(run), final_model(reference1)) == 0.0
    # The resumed job cleaned up what the kills left and kept the newest --keep-checkpoints checkpoints
    # (best.pt, the best-scoring weights, stands apart).
    assert sorted(os.listdir(folder)) == ["best.json", "best.pt"] + [
        f"step-{s:08d}.{ext}" for s in (SHORT_STEPS - 1, SHORT_STEPS) for ext in ("json", "pt")
    ]


DAMAGES = {
    "truncated": lambda pt: pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2]),
    "flipped bytes": flip_bytes,
    "sidecar deleted": lambda pt: pt.with_suffix(".json").unlink(),
}


@pytest.mark.process
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_checkpoint_is_skipped(damage, reference2, tmp_path, caplog):
    folder = shutil.copytree(reference2 / "checkpoints", tmp_path / "checkpoints")
    previous, newest = sorted(folder.glob("step-*.pt"))[-2:]
    DAMAGES[damage](newest)
    config = json.loads((reference2 / "config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="ddp_mnist"):
        assert Checkpointer(folder, keep=10, is_main=True).choose(config) == previous
    assert f"skipping checkpoint {newest}" in caplog.text
    assert f"resuming from {previous}, the newest good checkpoint" in caplog.text


@pytest.mark.process
def test_no_good_checkpoint_left_is_an_error_naming_the_files(reference2, tmp_path):
    folder = shutil.copytree(reference2 / "checkpoints", tmp_path / "checkpoints")
    damaged = sorted(folder.glob("step-*.pt"))
    for pt, damage in zip(damaged, [*DAMAGES.values()] * len(damaged)):
        damage(pt)
    config = json.loads((reference2 / "config.json").read_text())
    with pytest.raises(CheckpointError) as error:
        Checkpointer(folder, keep=10, is_main=True).choose(config)
    assert all(pt.name in str(error.value) for pt in damaged), error.value


@pytest.mark.process
def test_two_ranks_fall_back_to_the_same_checkpoint(reference2, tmp_path, data_dir):
    """Rank 0 chooses and broadcasts: both ranks skip the corrupt newest checkpoint, load the same one, and
    the job ends with the reference parameters (ranks that loaded different checkpoints could not)."""
    run = shutil.copytree(reference2, tmp_path / "run")
    (run / "results.json").unlink()  # died before writing its results: not finished, so --resume trains
    newest = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    flip_bytes(newest)
    proc = train(2, run, data_dir, *RECIPE, *KEEP_ALL, "--resume", timeout=180)
    output = proc.stdout + proc.stderr
    assert f"skipping checkpoint {newest}" in output
    assert resumed_step(output) == STEPS - 20
    assert output.count("skipping checkpoint") == 1  # decided once, on rank 0
    assert max_param_diff(final_model(run), final_model(reference2)) == 0.0


# ------------------------------------------------------------------------------------------------
# No silent hangs
# ------------------------------------------------------------------------------------------------
@pytest.mark.process
@pytest.mark.parametrize("fault", ["stop", "kill"])
@pytest.mark.parametrize("data_path", ["loader", "resident"])
def test_stalled_or_dead_rank_is_named_within_the_timeout(fault, data_path, tmp_path, data_dir):
    """Rank 1 stalls (SIGSTOP) or dies (SIGKILL) right after step 30, without torchrun restarts: rank 0 ends
    with one line saying which rank stopped answering and what it was last doing: a stalled peer after
    --timeout-s (its collective times out), a dead one at once (its connection closes)."""
    timeout_s = 6
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    proc = launch(
        2,
        run,
        data_dir,
        log,
        "--recipe",
        "tutorial",
        "--max-steps",
        "6000",
        "--checkpoint-every",
        "20",
        "--timeout-s",
        str(timeout_s),
        "--data-path",
        data_path,
        fault=f"{fault}:step=30:rank=1",
    )
    try:
        wait_until(
            lambda: "rank 1 stopped answering" in log.read_text() and list(run.glob("logs/hang-*/roll-call.txt")),
            proc,
            log,
            timeout_s + 120,
            "rank 0's line about rank 1 and its roll call",
            poll=0.2,
        )
        for pid in workers(proc.pid).values():  # cleanup: a stopped rank would hold torchrun for 30 s
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=60) != 0
    finally:
        kill_all(proc)
    output = log.read_text()
    match = re.search(
        r"rank 0 (?:failed: PeerError:|ends \(watchdog[^)]*\):) rank 1 stopped answering; "
        r"its last report \((\d+) s ago\): after step 30\b",
        output,
    )
    assert match, output[-3000:]
    if fault == "stop":
        assert int(match[1]) >= timeout_s - 1
    # The hang's evidence: rank 0's stacks (blocked in the collective), none from rank 1, and a roll call
    # that names rank 1, silent after step 30.
    (folder,) = run.glob("logs/hang-*")
    assert sorted(p.name for p in folder.iterdir()) == ["rank-0.txt", "roll-call.txt"]
    roll_call = (folder / "roll-call.txt").read_text().splitlines()
    assert roll_call[2].startswith("rank 1: after step 30, report ") and roll_call[2].endswith(", no stacks, SILENT")
    assert roll_call[-1] == "silent: rank 1 (stopped or dead); the others wait for it"
    assert "thread MainThread" in (folder / "rank-0.txt").read_text()


@pytest.mark.process
def test_watchdog_ends_a_rank_stuck_outside_any_collective(tmp_path, data_dir):
    """Rank 0's main thread blocks for good after step 30, outside any collective (as a host read does under
    NCCL without async error handling): rank 1's collective times out and rank 1 fails, and nothing would
    ever end rank 0 but its watchdog, which names rank 1's failure and ends it."""
    timeout_s = 4
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    proc = launch(
        2,
        run,
        data_dir,
        log,
        "--recipe",
        "tutorial",
        "--max-steps",
        "6000",
        "--timeout-s",
        str(timeout_s),
        "--stop-check-every",
        "1",  # rank 1 then waits in the stop check after step 30, as the roll call below says
        fault="hang:step=30:rank=0",
    )
    try:
        assert proc.wait(timeout=120) != 0
    finally:
        kill_all(proc)
    output = log.read_text()
    assert re.search(
        r"ddp-mnist: rank 0 ends \(watchdog, --timeout-s 4\): rank 1 failed during stop check after "
        r"step 30: RuntimeError: \S+",
        output,
    ), output[-3000:]
    assert "this rank was in: after step 30" in output
    assert not re.search(r"exitcode\s*:\s*-9", output), output[-3000:]  # it ended itself, not torchrun's SIGKILL
    # The hang's evidence: both ranks' stacks, rank 0's showing the frame it is stuck in, and a roll call that
    # names rank 0 as the one behind (rank 1 waits one phase further on, in the stop check's all-reduce).
    (folder,) = run.glob("logs/hang-*")
    assert sorted(p.name for p in folder.iterdir()) == ["rank-0.txt", "rank-1.txt", "roll-call.txt"]
    stuck = (folder / "rank-0.txt").read_text().split("thread ")[1]  # the main thread comes first
    assert stuck.startswith("MainThread") and "in fault_point" in stuck and "in after_step" in stuck
    assert (folder / "roll-call.txt").read_text().splitlines()[-1] == (
        "behind: rank 0: after step 30 (the others are further on and wait for it)"
    )


@pytest.mark.process
@pytest.mark.alone
def test_a_slowed_rank_is_named_in_the_epoch_line_metrics_and_status(tmp_path, data_dir, capsys):
    """Rank 1 sleeps half its step's time after every step (DDP_MNIST_FAULT slow=0.5): both ranks' steps take
    as long (the all-reduce waits), but rank 1's own work is 50% more. It is named by its second slow epoch
    (--slow-rank-seconds 0: its 1 s epochs are far shorter than the default's 30 s), with an excess within a
    factor of 2 of the truth; rank 0 never is."""
    run = tmp_path / "run"
    proc = train(
        2,
        run,
        data_dir,
        *("--recipe", "tutorial", "--batch-size", "1000", "--epochs", "3", "--eval-every", "3"),
        *("--slow-rank-seconds", "0"),
        DDP_MNIST_FAULT="slow=0.5:step=1:rank=1",
    )
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 3 and "slow:" not in epochs[0], proc.stdout  # one slow epoch may be noise: not named
    named = [m for line in epochs[1:] if (m := re.search(r"  slow: rank 1 \(\+(\d+)%\)$", line))]
    assert named and 25 <= int(named[0][1]) <= 100, proc.stdout  # the truth: +50%
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(len(row["work_ms_per_step"]) == 2 for row in rows)
    assert all(set(row["slow_ranks"]) <= {"1"} for row in rows) and rows[-1]["slow_ranks"], rows
    from ddp_mnist.commands.cli import main

    assert main(["status", str(run)]) == 0
    assert re.search(
        r"^slow \(own work per step, over the median of the others\): rank 1 \(\+\d+%\)$",
        capsys.readouterr().out,
        re.MULTILINE,
    )


# ------------------------------------------------------------------------------------------------
# Numerical faults
# ------------------------------------------------------------------------------------------------
@pytest.mark.process
def test_nan_loss_stops_training_naming_the_step(tmp_path, data_dir):
    diverging = ("--recipe", "tutorial", "--lr", "1000")
    proc = train(2, tmp_path / "nan", data_dir, *diverging, "--max-steps", "100", check=False, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # The ranks agree on the first bad step (one all-reduce): every line that names one (a rank's own error,
    # and torchrun's summary of the error files) names the same. (torchrun may end one rank before it prints.)
    steps = {int(s) for s in re.findall(r"the training loss became NaN or infinite at step (\d+)", output)}
    assert len(steps) == 1 and "ddp-mnist: error: the training loss became NaN" in output, output[-3000:]
    assert not (tmp_path / "nan" / "results.json").exists()
    # The named step is the first bad one: the same run stopped one step earlier finishes cleanly.
    step = steps.pop()
    train(1, tmp_path / "before", data_dir, *diverging, "--max-steps", str(step - 1))


@pytest.mark.process
def test_fp16_skipped_steps_are_counted_not_errors(tmp_path, data_dir):
    # lr 1.6 makes some fp16 gradients overflow (measured here: 5 of the first 20 steps); the gradient
    # scaler skips those steps and lowers its scale, and training goes on.
    proc = train(
        1, tmp_path / "run", data_dir, "--recipe", "tutorial", "--precision", "fp16", "--lr", "1.6", "--max-steps", "20"
    )
    skipped = results(tmp_path / "run")["skipped_steps"]
    assert skipped > 0
    assert f"the gradient scaler skipped {skipped} of 20 steps" in proc.stdout

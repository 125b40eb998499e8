"""The job's time limit (training/time_limit.py): rank 0 reads the job's end time ($DDP_MNIST_END_TIME, else
`squeue`) and, when the next stop check, a checkpoint and the margin no longer fit before it, requests the stop
that every rank takes up at the same step: a checkpoint, then a requeue as on the warning signal.

The rule is tested here with an injected end time; the two tests against SLURM's real time limit (`--time=1`,
no `--signal`: the project's script, and a plain `sbatch --wrap`) are in test_slurm.py.
"""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import final_model, max_param_diff, parse, results, train

from ddp_mnist.errors import ConfigError
from ddp_mnist.parallel.faults import Fault
from ddp_mnist.training.signals import EXIT_PREEMPTED, StopSignals
from ddp_mnist.training.time_limit import END_TIME_ENV, TimeLimit, job_end_time, read_end


def squeue_printing(folder: Path, output: str) -> dict[str, str]:
    """An environment whose `squeue` prints OUTPUT and records its arguments in folder/squeue.args."""
    (folder / "squeue").write_text(f'#!/bin/sh\necho "$@" > {folder}/squeue.args\necho "{output}"\n')
    (folder / "squeue").chmod(0o755)
    return {"PATH": str(folder), "SLURM_JOB_ID": "7"}


def near_end(seconds_left: float, longest_save_s: float = 0.0) -> TimeLimit:
    checkpointer = SimpleNamespace(longest_save_s=longest_save_s)
    return TimeLimit(time.time() + seconds_left, 60.0, StopSignals(), checkpointer)  # type: ignore[arg-type]


# ------------------------------------------------------------------ where the end time comes from
def test_the_injected_end_time_wins_and_a_bad_one_is_a_clear_error():
    injected = job_end_time({END_TIME_ENV: "1800000000.5", "SLURM_JOB_ID": "7"})
    assert injected == (1800000000.5, END_TIME_ENV, False, None)
    with pytest.raises(ConfigError, match=r"DDP_MNIST_END_TIME='tomorrow' is not a time in Unix seconds"):
        job_end_time({END_TIME_ENV: "tomorrow"})
    assert job_end_time({}) == (None, "not a SLURM job", False, None)


@pytest.mark.process
def test_under_slurm_the_end_time_is_squeues_for_this_job_or_this_array_element(tmp_path):
    env = squeue_printing(tmp_path, "2026-12-04T03:29:39 2026-12-04T03:30:39")
    end, source, _, start = job_end_time(env)
    assert end == datetime.datetime(2026, 12, 4, 3, 30, 39).timestamp() and source == "SLURM job 7"
    assert start == datetime.datetime(2026, 12, 4, 3, 29, 39).timestamp()
    assert (tmp_path / "squeue.args").read_text().split() == ["--noheader", "--jobs", "7", "--format", "%S", "%e"]
    job_end_time({**env, "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "1"})  # the element, not the array
    assert "--jobs 5_1 " in (tmp_path / "squeue.args").read_text()


@pytest.mark.process
def test_a_job_without_a_limit_or_without_squeue_is_not_watched_and_says_why(tmp_path, caplog):
    no_limit = job_end_time(squeue_printing(tmp_path, "2026-12-04T03:29:39 NONE"))
    assert no_limit == (None, "the SLURM job has no time limit", False, None)
    cfg = parse("--recipe", "tutorial").resolved()
    assert read_end(cfg, {"PATH": "/nonexistent", "SLURM_JOB_ID": "7"}) == (None, False)
    assert re.search(r"time limit is not watched: `squeue .*` failed: .*sbatch --signal=USR1@120", caplog.text)


def test_a_job_with_no_time_to_train_is_a_clear_error_and_the_switch_turns_the_watch_off():
    cfg = parse("--time-limit-margin-s", "60").resolved()
    with pytest.raises(ConfigError, match=r"the job ends in \d+ s .*within --time-limit-margin-s 60: no time to"):
        read_end(cfg, {END_TIME_ENV: str(time.time() + 30)})
    off = parse("--no-watch-time-limit").resolved()
    watch = TimeLimit.of_job(off, True, StopSignals(), None, {END_TIME_ENV: str(time.time() + 30)})  # type: ignore[arg-type]
    assert watch.end is None


def slurm_times(*seconds_from_now: float) -> str:
    """squeue's StartTime and EndTime (local time) of a job."""
    now = time.time()
    return " ".join(datetime.datetime.fromtimestamp(now + s).isoformat(timespec="seconds") for s in seconds_from_now)


@pytest.mark.process
def test_an_attempt_that_started_too_late_to_train_requeues_after_its_first_step(tmp_path, caplog):
    """A start slowed by a busy node (50 s of a one-minute job gone before the first step) is not an error: the
    stop check comes after the first step and stops it (a checkpoint, then the requeue). Only a job whose whole
    limit is within the margin is an error: no requeue could ever help it."""
    cfg = parse("--time-limit-margin-s", "15").resolved()
    end, late = read_end(cfg, squeue_printing(tmp_path, slurm_times(-50, 10)))
    assert late and end is not None and abs(end - time.time() - 10) < 2
    assert re.search(r"in \d+ s\): this attempt started \d+ s ago, too late to train; it checkpoints", caplog.text)
    watch = TimeLimit(end, 15.0, StopSignals(), SimpleNamespace(longest_save_s=0.0), late)  # type: ignore[arg-type]
    assert watch.due(1, every=50) and not TimeLimit(end, 15.0, StopSignals(), None).due(1, every=50)  # type: ignore[arg-type]
    watch.check()
    assert watch.signals.pending and watch.signals.name == "the time limit"
    with pytest.raises(ConfigError, match=r"the job ends in \d+ s \(SLURM job 7\), within --time-limit-margin-s 15"):
        read_end(cfg, squeue_printing(tmp_path, slurm_times(-4, 10)))  # a 14 s job


# ------------------------------------------------------------------ the rule
def test_the_stop_comes_when_the_next_interval_a_checkpoint_and_the_margin_no_longer_fit():
    watch = near_end(100.0, longest_save_s=5.0)
    watch.last_check -= 30.0  # a 30 s interval since the last check: 30 + 5 + 60 = 95 s needed, about 100 left
    watch.check()
    assert not watch.signals.pending
    watch.last_check -= 40.0  # the longest recent interval is now 40 s: 105 s needed
    watch.check()
    signals = watch.signals
    assert signals.pending and signals.wants_requeue and signals.name == "the time limit"
    assert re.fullmatch(r"the job's time limit is near \(\d+ s left; .* need 105 s\)", signals.cause)


def test_only_rank_0_decides_and_a_signal_already_taken_is_kept():
    elsewhere = TimeLimit(None, 60.0, StopSignals(), SimpleNamespace(longest_save_s=0.0))  # type: ignore[arg-type]
    elsewhere.last_check -= 10_000
    elsewhere.check()
    assert not elsewhere.signals.pending  # not rank 0: it follows rank 0 at the stop check's all-reduce
    watch = near_end(1.0)
    watch.signals.received = 15  # SIGTERM came first: the stop is SIGTERM's (no requeue)
    watch.check()
    assert watch.signals.name == "SIGTERM" and not watch.signals.wants_requeue


def test_the_pace_fault_acts_after_every_step_from_its_step_on():
    assert Fault.parse("pace=0.25:step=3") == Fault("pace", "step", 3, None, 0.25)
    with pytest.raises(ValueError, match="pace=S"):
        Fault.parse("pace=0.25:save-pt=3")


# ------------------------------------------------------------------ real ranks, an injected end time
TRAIN = ("--recipe", "tutorial", "--max-steps", "300", "--seed", "3", "--checkpoint-every", "100")


@pytest.mark.process
def test_two_ranks_near_their_end_time_checkpoint_at_one_step_stop_and_resume_exactly(data_dir, tmp_path):
    """Outside SLURM's batch scripts the job ends with one line and exit 75 (EX_TEMPFAIL: try again); every rank
    stopped at the step rank 0 chose (one checkpoint), and --resume ends where an uninterrupted run ends."""
    end = time.time() + 45  # steps of 0.1 s: the stop comes about 15 s in (30 s margin), long before step 300
    run = tmp_path / "run"
    proc = train(
        2,
        run,
        data_dir,
        *TRAIN,
        "--time-limit-margin-s",
        "30",
        check=False,
        DDP_MNIST_END_TIME=f"{end:.3f}",
        DDP_MNIST_FAULT="pace=0.1:step=1",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert re.search(r"time limit: the job ends at .* \(DDP_MNIST_END_TIME, in \d+ s\)", out), out[-3000:]
    stop = re.search(
        r"the job's time limit is near \(\d+ s left; .*\): checkpointing at step (\d+), then stopping", out
    )
    assert stop, out[-3000:]
    step = int(stop[1])
    assert 1 <= step < 300 and time.time() < end
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))[-1] == f"step-{step:08d}.pt"
    assert not (run / "results.json").exists() and "Traceback" not in out

    train(2, run, data_dir, "--resume")
    whole = tmp_path / "whole"
    train(2, whole, data_dir, *TRAIN)
    assert results(run)["steps"] == results(whole)["steps"] == 300
    assert max_param_diff(final_model(run), final_model(whole)) == 0.0

"""The job's time limit (training/time_limit.py): rank 0 reads the job's end time ($DDP_MNIST_END_TIME, else
`squeue`) and, when the next stop check, a checkpoint and the margin no longer fit before it, requests the stop
that every rank takes up at the same step: a checkpoint, then a requeue as on the warning signal.

The rule is tested here with an injected end time; the two tests against SLURM's real time limit (`--time=1`,
no `--signal`: the project's script, and a plain `sbatch --wrap`) are in test_slurm.py.
"""

from __future__ import annotations

import os
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
    script = f'#!/bin/sh\necho "$@" > {folder}/squeue.args\necho "$SLURM_TIME_FORMAT" > {folder}/squeue.format\n'
    (folder / "squeue").write_text(script + f'echo "{output}"\n')
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
    """squeue prints Unix seconds whatever the user's SLURM_TIME_FORMAT (no local time read twice when clocks go
    back an hour)."""
    env = {**squeue_printing(tmp_path, "1796376369 1796376429 1:00"), "SLURM_TIME_FORMAT": "relative"}
    assert job_end_time(env) == (1796376429.0, "SLURM job 7", False, 1796376369.0)
    assert (tmp_path / "squeue.args").read_text().split() == ["--noheader", "--jobs", "7", "--format", "%S", "%e", "%l"]
    assert (tmp_path / "squeue.format").read_text().strip() == "%s"
    job_end_time({**env, "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "1"})  # the element, not the array
    assert "--jobs 5_1 " in (tmp_path / "squeue.args").read_text()


@pytest.mark.process
def test_a_job_without_a_limit_or_without_squeue_is_not_watched_and_says_why(tmp_path, caplog):
    no_limit = job_end_time(squeue_printing(tmp_path, "1796376369 1827912369 UNLIMITED"))  # a year on, squeue says
    assert no_limit == (None, "the SLURM job has no time limit", False, None)
    cfg = parse("--recipe", "tutorial").resolved()
    assert read_end(cfg, tmp_path, {"PATH": "/nonexistent", "SLURM_JOB_ID": "7"}) == (None, False)
    assert re.search(r"time limit is not watched: `squeue .*` failed: .*sbatch --signal=USR1@120", caplog.text)


def test_a_job_with_no_time_to_train_is_a_clear_error_and_the_switch_turns_the_watch_off():
    cfg = parse("--time-limit-margin-s", "60").resolved()
    with pytest.raises(ConfigError, match=r"the job ends in \d+ s .*within --time-limit-margin-s 60: no time to"):
        read_end(cfg, Path("unused"), {END_TIME_ENV: str(time.time() + 30)})
    for bad in ("inf", "nan", "1e20", "-5"):
        with pytest.raises(ConfigError, match="is not a time in Unix seconds"):
            job_end_time({END_TIME_ENV: bad})
    off = parse("--no-watch-time-limit").resolved()
    watch = TimeLimit.of_job(off, Path("unused"), StopSignals(), None, {END_TIME_ENV: str(time.time() + 30)})  # type: ignore[arg-type]
    assert watch.end is None


def slurm_times(*seconds_from_now: float) -> str:
    """squeue's StartTime and EndTime (Unix seconds) of a one-minute job."""
    return " ".join(str(int(time.time() + s)) for s in seconds_from_now) + " 1:00"


@pytest.mark.process
def test_an_attempt_that_started_too_late_to_train_requeues_after_its_first_step_once(tmp_path, caplog):
    """A start slowed by a busy node (50 s of a one-minute job gone before the first step) is not an error: the
    stop check comes after the first step and stops it (a checkpoint, then the requeue). A second late attempt
    in a row would requeue for ever: a clear error, as is a job whose whole limit is within the margin."""
    cfg = parse("--time-limit-margin-s", "15").resolved()
    end, late = read_end(cfg, tmp_path, squeue_printing(tmp_path, slurm_times(-50, 10)))
    assert late and end is not None and abs(end - time.time() - 10) < 2
    assert re.search(r"in \d+ s\): this attempt started \d+ s ago, too late to train; it checkpoints", caplog.text)
    assert (tmp_path / "late-start").exists()
    watch = TimeLimit(end, 15.0, StopSignals(), SimpleNamespace(longest_save_s=0.0), late)  # type: ignore[arg-type]
    assert [watch.due(step, every=50) for step in (1, 2, 3)] == [True, True, True]
    watch.check()
    assert watch.signals.pending and watch.signals.name == "the time limit"
    with pytest.raises(ConfigError, match=r"two attempts in a row started too late to train: this one \d+ s after"):
        read_end(cfg, tmp_path, squeue_printing(tmp_path, slurm_times(-50, 10)))
    assert read_end(cfg, tmp_path, squeue_printing(tmp_path, slurm_times(0, 60))) == (
        pytest.approx(end + 50, abs=2),
        False,
    )
    assert not (tmp_path / "late-start").exists()  # an attempt in time clears it
    with pytest.raises(ConfigError, match=r"the job ends in \d+ s \(SLURM job 7\), within --time-limit-margin-s 15"):
        read_end(cfg, tmp_path, squeue_printing(tmp_path, slurm_times(-4, 10)))  # a 14 s job


# ------------------------------------------------------------------ the rule
def test_the_stop_comes_when_the_longest_recent_interval_a_checkpoint_and_the_margin_no_longer_fit():
    watch = near_end(1000.0, longest_save_s=5.0)
    watch.last_check -= 500.0  # up to the attempt's first check: its start-up, not an interval between checks
    watch.check()
    watch.end = time.time() + 100.0
    watch.last_check -= 10.0
    watch.check()  # 10 + 5 + 60 = 75 s needed, 100 left: the start-up's 500 s no longer count
    assert not watch.signals.pending
    watch = near_end(100.0, longest_save_s=5.0)
    watch.check()
    for gap in (30.0, 25.0):  # the longest recent interval, not the last one: 30 + 5 + 60 = 95 s, 100 left
        watch.last_check -= gap
        watch.check()
    assert not watch.signals.pending
    watch.last_check -= 40.0  # now 40 s: 105 s needed
    watch.check()
    signals = watch.signals
    assert signals.pending and signals.wants_requeue and signals.name == "the time limit"
    assert re.fullmatch(r"the job's time limit is near \(\d+ s left; .* need 105 s\)", signals.cause)


def test_the_stop_check_comes_after_the_first_step_of_an_attempt_then_every_n_steps():
    watch = near_end(1000.0)
    assert [step for step in range(41, 121) if watch.due(step, every=50)] == [41, 50, 100]
    watch = near_end(1000.0)
    assert [step for step in range(1, 60) if watch.due(step, every=21, pause_at=30)] == [1, 21, 30, 42]


def test_the_cpu_stop_check_interval_comes_from_the_steps_flops():
    """About 0.1 s of steps at an assumed 50 GFLOP/s, from the config alone (every rank the same); the FLOPs
    table agrees with the counted FLOPs."""
    from ddp_mnist.model import TRAIN_FLOPS_PER_SAMPLE, build_model
    from ddp_mnist.training.profiling import flops_per_sample
    from ddp_mnist.training.settings import cpu_stop_check_every

    for model, flops in TRAIN_FLOPS_PER_SAMPLE.items():
        assert flops_per_sample(build_model(model)) == flops
    assert cpu_stop_check_every(parse("--recipe", "tutorial").resolved()) == 21
    assert cpu_stop_check_every(parse("--recipe", "fast").resolved()) == 4
    assert cpu_stop_check_every(parse("--recipe", "fast", "--model", "cnn").resolved()) == 1


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
    stopped at the step rank 0 chose (one checkpoint). A late attempt stops after its first step on every rank.
    --resume ends where an uninterrupted run ends."""
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

    # The next attempt, under a batch script on SLURM, reaches its first step with 10 s of its minute left: every
    # rank checks after that one step, checkpoints, and leaves the requeue to the script.
    slurm = squeue_printing(tmp_path, slurm_times(-50, 10))
    late = train(
        2,
        run,
        data_dir,
        "--resume",
        "--time-limit-margin-s",
        "15",
        PATH=f"{slurm['PATH']}:{os.environ['PATH']}",
        SLURM_JOB_ID=slurm["SLURM_JOB_ID"],
        DDP_MNIST_SCRIPT_REQUEUES="1",
    )
    out = late.stdout + late.stderr
    assert f"checkpointing at step {step + 1}, then requeueing" in out, out[-3000:]
    assert (run / "requeue-requested").exists() and (run / "late-start").exists()
    train(2, run, data_dir, "--resume")
    whole = tmp_path / "whole"
    train(2, whole, data_dir, *TRAIN)
    assert results(run)["steps"] == results(whole)["steps"] == 300
    assert max_param_diff(final_model(run), final_model(whole)) == 0.0

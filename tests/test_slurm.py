"""The SLURM batch scripts (slurm/) against a real SLURM cluster: one node on this machine, CPU ranks on gloo.

Every job is a real `sbatch` of a real script. Its state comes from `scontrol show job` (this cluster
keeps no accounting), its numbers from results.json, which must equal the same training run without
SLURM (same seed and global batch; the tutorial's SGD recipe keeps the comparison exact).

All jobs are submitted up front (the preempted ones first), so that the cluster works through the
queue while the references run and while a requeued job waits for its restart; each test then checks
its own job. A preempted job waits at step PAUSE (`--pause-at-step`) until a thread, which saw it say
so in its log, signals it; the job must then checkpoint, requeue (Restarts=1), resume and end with the
same parameters as an uninterrupted run.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, base_env, final_model, max_param_diff, results, run_cmd, train

pytestmark = pytest.mark.process  # every test here starts processes (docs/testing.md)

SLURM_DIR = ROOT / "slurm"
HOW_TO_ENABLE = (
    "run `bash .ci/run` as root, or start a cluster as root with "
    "`SLURM_PREFIX=/tmp/slurm-dev bash tests/slurm_cluster/start_slurm.sh` and set DDP_MNIST_SLURM=1"
)
# Short and exact: the tutorial's SGD recipe, a checkpoint every 30 steps (the preemption tests signal
# a job when its first one appears).
STEPS = 300
TRAIN = ("--recipe", "tutorial", "--max-steps", str(STEPS), "--checkpoint-every", "30", "--seed", "1", "--no-progress")
PAUSE = 30  # a preempted job waits here for its signal
# The numbers that describe the training itself (not its speed) and must match the reference exactly.
# (Not the backend: torchrun with one process has a gloo group, plain python none.)
SAME = (
    "test_accuracy",
    "test_loss",
    "test_samples",
    "steps",
    "world_size",
    "batch_size",
    "model",
    "recipe",
    "seed",
    "device",
    "precision",
)
JOB_TIMEOUT_S = 600
# The jobs that meet SLURM's real time limit (`--time=1`, no warning signal): steps slowed to PACE_S each
# (DDP_MNIST_FAULT pace: a sleep, no CPU), so the 300 steps need about 100 s, three attempts of a minute.
PACE_S = 0.3
TIME_LIMIT = ("--time-limit-margin-s", "15")
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


# ---------------------------------------------------------------------- without a cluster
def test_scripts_pass_shellcheck():
    scripts = [
        p
        for folder in (SLURM_DIR, ROOT / "launch", ROOT / "tests" / "slurm_cluster")
        for p in sorted(folder.glob("*.sh"))
    ]
    assert {p.name for p in scripts} >= {"lib.sh", "single_node.sh", "multi_node.sh", "sweep.sh"}
    if shutil.which("shellcheck") is None:
        message = "shellcheck is not installed (apt-get install shellcheck)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    proc = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_script_port_and_ranks_follow_the_package():
    """The torchrun topology's rendezvous port is the package's SLURM port (one rule, two languages)."""
    from ddp_mnist.parallel.env import slurm_port

    ids = [1, 19999, 20000, 123456, 987654321]
    script = (
        f"source {SLURM_DIR / 'lib.sh'}; for id in {' '.join(map(str, ids))}; do job_port $id; done; "
        "SLURM_TASKS_PER_NODE='4(x3)' ranks_per_node; SLURM_TASKS_PER_NODE=2 ranks_per_node"
    )
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=True, env=base_env(DDP_MNIST_DIR=str(ROOT))
    ).stdout.split()
    assert out == [str(slurm_port(str(i))) for i in ids] + ["4", "2"]


def test_sweep_rejects_a_world_size_that_does_not_fit_before_submitting(tmp_path):
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / "sweep.sh")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=base_env(WORLD_SIZES="1 2 6", GPUS_PER_NODE="0", RANKS_PER_NODE="4"),
    )
    assert proc.returncode == 2 and "world size 6" in proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing was submitted


def outcome(
    tmp_path: Path,
    rc: int,
    *,
    results_before: bool = False,
    results_after: bool = False,
    marker: str | None = None,
    **slurm: str,
) -> subprocess.CompletedProcess:
    """lib.sh's job_outcome for a run folder in the given state; `scontrol` is a stub that logs its arguments."""
    run, stub = tmp_path / "run", tmp_path / "bin"
    run.mkdir(parents=True)
    stub.mkdir()
    (stub / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (stub / "scontrol").chmod(0o755)
    if results_before:
        (run / "results.json").write_text("{}")
    script = f"source {SLURM_DIR / 'lib.sh'}; before=$(results_stamp {run}); "
    if results_after:
        script += f"touch -d '+1 minute' {run}/results.json; "
    if marker:
        (run / "requeue-requested").write_text(marker + "\n")
    script += f'job_outcome {run} "$before" {rc}'
    env = base_env(DDP_MNIST_DIR=str(ROOT), SLURM_JOB_ID="42", PATH=f"{stub}:{os.environ['PATH']}", **slurm)
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)


def test_batch_script_outcome_comes_from_the_run_folder(tmp_path):
    """Complete (results.json written by this attempt) = exit 0 whatever the step said (torchrun's agent fails
    on a signal that comes after the ranks are done); a requeue marker = one line and `scontrol requeue`."""
    done = outcome(tmp_path / "done", 1, results_after=True)
    assert done.returncode == 0 and "training complete" in done.stdout, done
    again = outcome(tmp_path / "again", 2, results_before=True)  # an old results.json is not this attempt's
    assert again.returncode == 2, again
    failed = outcome(tmp_path / "failed", 3)
    assert failed.returncode == 3 and not (tmp_path / "failed" / "scontrol.calls").exists(), failed
    requeue = outcome(tmp_path / "requeue", 0, marker="SIGUSR1 at step 30")
    assert requeue.returncode == 0, requeue
    assert requeue.stdout.splitlines() == [
        "ddp-mnist: the ranks stopped on SIGUSR1 at step 30 with a checkpoint: requeueing SLURM job 42"
    ]
    assert (tmp_path / "requeue" / "scontrol.calls").read_text() == "requeue 42\n"
    assert not (tmp_path / "requeue" / "run" / "requeue-requested").exists()  # one requeue per marker


def test_an_array_element_requeues_itself_not_the_array(tmp_path):
    """An element of `sbatch --array` whose own job id is the array's (SLURM gives one element that id):
    `scontrol requeue 42` would requeue every element, so the script names the element, 42_1; the package's
    own requeue (launched without these scripts) names it the same way."""
    from ddp_mnist.parallel.env import slurm_job_spec

    array = {"SLURM_ARRAY_JOB_ID": "42", "SLURM_ARRAY_TASK_ID": "1"}
    requeue = outcome(tmp_path, 0, marker="SIGUSR1 at step 30", **array)
    assert requeue.returncode == 0 and requeue.stdout.endswith("requeueing SLURM job 42_1\n"), requeue
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 42_1\n"
    assert slurm_job_spec({"SLURM_JOB_ID": "42", **array}) == "42_1"
    assert slurm_job_spec({"SLURM_JOB_ID": "43"}) == "43" and slurm_job_spec({}) is None


def job_steps(tmp_path: Path, topology: str, preflight: bool, doctor_status: int = 0, **extra: str):
    """lib.sh's run_training in a one-node allocation of 2 ranks, with stubs for `srun` (it logs each job step and
    exits 0, or DOCTOR_STATUS for doctor) and `scontrol`. Returns the script's outcome and the steps it ran."""
    stub, steps = tmp_path / "bin", tmp_path / "steps"
    stub.mkdir(parents=True)
    (stub / "srun").write_text(
        f'#!/bin/sh\necho "$*" >> {steps}\ncase "$*" in *" doctor"*) exit {doctor_status};; esac\n'
    )
    (stub / "scontrol").write_text("#!/bin/sh\necho node1\n")
    for path in stub.iterdir():
        path.chmod(0o755)
    allocation = dict(
        SLURM_JOB_ID="42",
        SLURM_JOB_NAME="job",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="node1",
        SLURM_TASKS_PER_NODE="2",
        SLURM_CPUS_ON_NODE="2",
    )
    env = base_env(DDP_MNIST_DIR=str(ROOT), PATH=f"{stub}:{os.environ['PATH']}", TOPOLOGY=topology, **allocation)
    env.update(RUN_DIR=str(tmp_path.parent / "run"), DATA_DIR="/data", **({"PREFLIGHT": "1"} if preflight else {}))
    env.update(extra)
    script = f"source {SLURM_DIR / 'lib.sh'}; run_training --max-steps 5"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    return proc, steps.read_text().splitlines() if steps.exists() else []


@pytest.mark.parametrize("topology", ["torchrun", "srun"])
def test_preflight_runs_doctor_as_training_runs_and_a_finding_stops_the_job(tmp_path, topology):
    proc, steps = job_steps(tmp_path / "off", topology, preflight=False)
    assert proc.returncode == 0 and len(steps) == 1 and " train " in steps[0], (proc, steps)
    train = steps[0]

    proc, steps = job_steps(tmp_path / "on", topology, preflight=True)
    assert proc.returncode == 0 and steps[1] == train, (proc, steps)
    launcher = train.split(" -m ddp_mnist train ")[0]
    assert steps[0] == f"{launcher} -m ddp_mnist doctor --data-dir /data --device cpu"  # the same ranks, data, device
    assert "ddp-mnist: preflight: ddp-mnist doctor on every rank, before training" in proc.stdout

    proc, steps = job_steps(tmp_path / "found", topology, preflight=True, doctor_status=1)
    assert proc.returncode == 1 and len(steps) == 1 and " doctor " in steps[0] + " ", (proc, steps)
    assert "doctor failed with exit status 1 (its report is above): not training" in proc.stderr


def sweep_submissions(tmp_path: Path, array: str, **extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """slurm/sweep.sh over world sizes 1 and 2 and two variants, with a stub `sbatch` that logs each call."""
    stub = tmp_path / "bin"
    stub.mkdir(parents=True)
    calls = tmp_path / "sbatch.calls"
    (stub / "sbatch").write_text(f'#!/bin/sh\necho "RUN_DIR=$RUN_DIR ARRAY_PLAN=$ARRAY_PLAN $*" >> {calls}\necho 7\n')
    (stub / "sbatch").chmod(0o755)
    env = base_env(PATH=f"{stub}:{os.environ['PATH']}", WORLD_SIZES="1 2", GPUS_PER_NODE="0", RANKS_PER_NODE="2")
    env.update(RUN_ROOT="sw", VARIANTS="--static-graph; --bucket-cap-mb 1", ARRAY=array, **extra)
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / "sweep.sh"), "--", "--max-steps", "5"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    return proc, calls.read_text().splitlines() if calls.exists() else []


def test_sweep_submits_one_job_per_variant_and_world_size_or_one_array_per_world_size(tmp_path):
    proc, calls = sweep_submissions(tmp_path / "jobs", "0")
    assert proc.returncode == 0 and len(calls) == 4, (proc, calls)
    assert calls[0].startswith("RUN_DIR=sw/static-graph/ws1 ARRAY_PLAN= --parsable --job-name=ddp-mnist-ws1 ")
    assert calls[0].endswith("single_node.sh --max-steps 5 --static-graph"), calls[0]
    assert calls[3].startswith("RUN_DIR=sw/bucket-cap-mb-1/ws2 ") and calls[3].endswith(" --bucket-cap-mb 1")

    proc, calls = sweep_submissions(tmp_path / "batch", "0", BATCH_PER_RANK="50")
    assert calls[1].endswith("single_node.sh --max-steps 5 --bucket-cap-mb 1 --batch-size 50"), calls[1]

    proc, calls = sweep_submissions(tmp_path / "arrays", "1")
    assert proc.returncode == 0 and len(calls) == 2, (proc, calls)
    for n, call in zip((1, 2), calls):
        assert call.startswith(f"RUN_DIR= ARRAY_PLAN=sw/ws{n}.array --parsable --array=0-1 --job-name=ddp-mnist-ws{n} ")
        assert f"--output=sw/ws{n}-%a.log" in call and call.endswith("single_node.sh --max-steps 5"), call
        plan = (tmp_path / "arrays" / "sw" / f"ws{n}.array").read_text().splitlines()
        assert [line.split("\t") for line in plan] == [
            [f"sw/static-graph/ws{n}", "--static-graph"],
            [f"sw/bucket-cap-mb-1/ws{n}", " --bucket-cap-mb 1"],
        ]
    assert (
        "bucket-cap-mb-1/ws2: job 7_1 (1 node(s) x 2 rank(s)) -> sw/bucket-cap-mb-1/ws2, log sw/ws2-1.log"
        in proc.stdout
    )
    sweep_submissions(tmp_path / "array-batch", "1", BATCH_PER_RANK="50")  # after the variant's flags, as above
    plan = (tmp_path / "array-batch" / "sw" / "ws2.array").read_text().splitlines()
    assert plan[1] == "sw/bucket-cap-mb-1/ws2\t --bucket-cap-mb 1 --batch-size 100", plan


def test_an_array_element_of_a_sweep_trains_its_own_variant_into_its_own_folder(tmp_path):
    plan = tmp_path / "ws2.array"
    plan.write_text("sw/a/ws2\t--static-graph\nsw/b/ws2\t --bucket-cap-mb 1\n")
    proc, steps = job_steps(tmp_path / "job", "srun", False, ARRAY_PLAN=str(plan), SLURM_ARRAY_TASK_ID="1")
    assert proc.returncode == 0 and len(steps) == 1, (proc, steps)
    assert " train --run-dir sw/b/ws2 " in steps[0] and steps[0].endswith(" --max-steps 5 --bucket-cap-mb 1"), steps
    proc, steps = job_steps(tmp_path / "missing", "srun", False, ARRAY_PLAN=str(plan), SLURM_ARRAY_TASK_ID="2")
    assert proc.returncode == 2 and not steps and "has no line for array element 2" in proc.stderr, proc


def test_script_and_package_agree_on_the_marker_and_the_signals():
    from ddp_mnist.artifacts.run_dir import RunDir
    from ddp_mnist.config.options import REQUEUE_SIGNAL_CHOICES

    out = subprocess.run(
        ["bash", "-c", f"source {SLURM_DIR / 'lib.sh'}; echo $REQUEUE_MARKER $REQUEUE_SIGNAL"],
        capture_output=True,
        text=True,
        check=True,
        env=base_env(DDP_MNIST_DIR=str(ROOT)),
    ).stdout
    marker, default_signal = out.split()
    assert marker == RunDir("x").requeue.name
    assert default_signal == REQUEUE_SIGNAL_CHOICES[0] == "USR1"


# ---------------------------------------------------------------------- the cluster and its jobs
@dataclass
class Job:
    name: str
    id: str
    run_dir: Path
    log: Path
    signal: list[str] | None = None  # sent at the event below ({job} -> the job id)
    signal_when: str = "paused"  # "paused": the job waits at step PAUSE; "complete": results.json was written;
    # "checkpoint": its checkpoint at step PAUSE was written (the job trains on, paced)
    signalled_at_step: int | None = None
    signal_error: str | None = None
    info: dict[str, str] = field(default_factory=dict)

    def wait(self) -> dict[str, str]:
        """`scontrol show job` once the job has ended (after any requeue)."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            self.info = show_job(self.id)
            if self.info.get("JobState") in ENDED:
                return self.info
            time.sleep(0.5)
        raise AssertionError(
            f"job {self.name} ({self.id}) did not end in {JOB_TIMEOUT_S} s: {self.info}\n{self.log_text()[-3000:]}"
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def completed(self) -> dict:
        info = self.wait()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
            f"job {self.name} ({self.id}) ended {info['JobState']} {info['ExitCode']}:\n{self.log_text()[-4000:]}"
        )
        return results(self.run_dir)


def show_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def cluster_up() -> bool:
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in ping.stdout


@pytest.fixture(scope="session")
def slurm_env(data_dir) -> dict[str, str]:
    if os.environ.get("DDP_MNIST_SLURM") != "1":
        pytest.skip(f"needs a SLURM cluster: {HOW_TO_ENABLE}")
    if not cluster_up():
        message = f"DDP_MNIST_SLURM=1 but `scontrol ping` finds no controller: {HOW_TO_ENABLE}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return base_env(data_dir)


def submit(
    name: str,
    script: str,
    out: Path,
    env: dict[str, str],
    *sbatch_args: str,
    signal: list[str] | None = None,
    signal_when: str = "paused",
    train: tuple[str, ...] = (),
) -> Job:
    run_dir, log = out / name, out / f"{name}.log"
    if signal and signal_when == "paused":
        train = (*train, "--pause-at-step", str(PAUSE))
    proc = run_cmd(
        [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            f"--output={log}",
            *sbatch_args,
            str(SLURM_DIR / script),
            *TRAIN,
            *train,
        ],
        {**env, "RUN_DIR": str(run_dir)},
        timeout=60,
    )
    return Job(name, proc.stdout.strip().split(";")[0], run_dir, log, signal, signal_when)


def signal_at_event(job: Job) -> None:
    """Send job.signal when the job is paused at step PAUSE (it says so in its log), when its checkpoint at step
    PAUSE appears, or, for a signal after the end, when results.json appears. (Polls the file system: the job
    runs in another process tree.)"""
    events = {
        "paused": lambda: f"paused at step {PAUSE} " in job.log_text(),
        "checkpoint": lambda: (job.run_dir / "checkpoints" / f"step-{PAUSE:08d}.json").exists(),
        "complete": lambda: (job.run_dir / "results.json").exists(),
    }
    for tick in range(int(JOB_TIMEOUT_S / 0.05)):
        if events[job.signal_when]():
            job.signalled_at_step = STEPS if job.signal_when == "complete" else PAUSE
            proc = subprocess.run([a.format(job=job.id) for a in job.signal], capture_output=True, text=True)
            job.signal_error = proc.stderr if proc.returncode else None
            return
        if tick % 20 == 0 and show_job(job.id).get("JobState") in ENDED:
            return
        time.sleep(0.05)


def submit_plain(name: str, out: Path, env: dict[str, str]) -> Job:
    """A user's own batch job, none of our scripts: `python -m ddp_mnist train --resume` in `sbatch --wrap`,
    with a one-minute time limit and no warning signal."""
    run_dir, log = out / name, out / f"{name}.log"
    train = [sys.executable, "-m", "ddp_mnist", "train", "--resume", "--run-dir", str(run_dir), *TRAIN, *TIME_LIMIT]
    wrap = ["--time=1", "--requeue", "--open-mode=append", "--wrap", " ".join(train)]
    proc = run_cmd(["sbatch", "--parsable", f"--job-name={name}", f"--output={log}", *wrap], env, timeout=60)
    return Job(name, proc.stdout.strip().split(";")[0], run_dir, log)


def submit_array(name: str, out: Path, env: dict[str, str]) -> list[Job]:
    """`sbatch --array=0-1 slurm/single_node.sh`, submitted from OUT without RUN_DIR: each element's run folder is
    the script's own, OUT/runs/NAME-<array id>_<element>. Element 1 gets the warning signal once its checkpoint
    at step PAUSE is written (both elements are paced: it still trains for about 25 s)."""
    sbatch = ["sbatch", "--parsable", "--array=0-1", f"--job-name={name}", f"--output={out}/{name}-%a.log"]
    proc = run_cmd([*sbatch, str(SLURM_DIR / "single_node.sh"), *TRAIN], {**env, "DDP_MNIST_DIR": str(ROOT)}, cwd=out)
    array = proc.stdout.strip().split(";")[0]
    elements = [
        Job(f"{name}_{i}", f"{array}_{i}", out / "runs" / f"{name}-{array}_{i}", out / f"{name}-{i}.log")
        for i in (0, 1)
    ]
    elements[1].signal, elements[1].signal_when = ["scancel", "--signal=USR1", "{job}"], "checkpoint"
    return elements


def without_scontrol(folder: Path) -> Path:
    """A PYTHON for the batch scripts whose ranks find no `scontrol` (as inside a container); returns it."""
    stub = folder / "no-scontrol"
    stub.mkdir()
    (stub / "scontrol").write_text('#!/bin/sh\necho "$0: not found" >&2\nexit 127\n')
    python = folder / "python-without-scontrol"
    python.write_text(f'#!/bin/sh\nPATH={stub}:$PATH exec {sys.executable} "$@"\n')
    for path in (stub / "scontrol", python):
        path.chmod(0o755)
    return python


@pytest.fixture(scope="session")
def jobs(slurm_env, tmp_path_factory) -> dict[str, Job]:
    out = tmp_path_factory.mktemp("slurm")
    srun = {**slurm_env, "TOPOLOGY": "srun"}
    # W&B offline (its finish takes seconds, after the checkpoint), and ranks without `scontrol`.
    wandb = {
        **{k: v for k, v in slurm_env.items() if k != "WANDB_API_KEY"},
        "WANDB_MODE": "offline",
        "WANDB_CACHE_DIR": str(out / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(out / "wandb-config"),
        "PYTHON": str(without_scontrol(out)),
    }
    paced = {**slurm_env, "DDP_MNIST_FAULT": f"pace={PACE_S}:step=1"}
    array = submit_array("array", out, {**slurm_env, "DDP_MNIST_FAULT": "pace=0.1:step=1"})
    submitted = {
        # The longest first: SLURM's real time limit, no warning signal, under our script and under a user's own.
        "time_limit": submit(
            "time_limit", "single_node.sh", out, paced, "--time=1", "--ntasks-per-node=1", train=TIME_LIMIT
        ),
        "plain_time_limit": submit_plain("plain_time_limit", out, paced),
        "array_0": array[0],
        "array_1": array[1],
        # Preemption, the way SLURM's warning arrives: `--signal=USR1@N` and `scancel --signal=USR1`
        # signal the job steps; `--signal=B:USR1@N` signals the batch shell only (= scancel --batch).
        # A user's `scontrol requeue` SIGTERMs everything and requeues the job itself.
        "steps_usr1": submit(
            "steps_usr1", "single_node.sh", out, wandb, train=("--wandb",), signal=["scancel", "--signal=USR1", "{job}"]
        ),
        "batch_usr2": submit(
            "batch_usr2",
            "multi_node.sh",
            out,
            {**srun, "REQUEUE_SIGNAL": "USR2"},
            "--nodes=1",
            signal=["scancel", "--batch", "--signal=USR2", "{job}"],
        ),
        "user_requeue": submit(
            "user_requeue", "single_node.sh", out, slurm_env, signal=["scontrol", "requeue", "{job}"]
        ),
        # The warning after the training is complete (during W&B's finish): the job still COMPLETED.
        "late_usr1": submit(
            "late_usr1",
            "single_node.sh",
            out,
            wandb,
            train=("--wandb",),
            signal=["scancel", "--signal=USR1", "{job}"],
            signal_when="complete",
        ),
        "srun": submit("srun", "single_node.sh", out, srun),
        # `ddp-mnist doctor` first, in the same job, on the same rendezvous port as the training after it.
        "preflight": submit("preflight", "single_node.sh", out, {**slurm_env, "PREFLIGHT": "1"}),
    }
    # The sweep, started from another folder: RUN_ROOT is relative to it, the scripts find themselves.
    # Two variants of DDP's knobs that train identically (a static graph changes no number): one command,
    # one job array per world size (ARRAY=1), one element per variant.
    sweep = run_cmd(
        ["bash", str(SLURM_DIR / "sweep.sh"), "--", *TRAIN],
        cwd=out,
        timeout=60,
        env={
            **slurm_env,
            "WORLD_SIZES": "1 2",
            "GPUS_PER_NODE": "0",
            "RANKS_PER_NODE": "2",
            "RUN_ROOT": "sweep",
            "VARIANTS": "--no-static-graph; --static-graph",
            "ARRAY": "1",
        },
    )
    for variant, n, job_id, log in re.findall(r"^([a-z-]+)/ws(\d+): job (\d+_\d) .*, log (\S+)$", sweep.stdout, re.M):
        key = f"ws{n}" if variant == "no-static-graph" else f"{variant}/ws{n}"
        submitted[key] = Job(key, job_id, out / "sweep" / variant / f"ws{n}", out / log)
    assert {"ws1", "ws2", "static-graph/ws1", "static-graph/ws2"} <= submitted.keys(), sweep.stdout + sweep.stderr
    threads = [
        threading.Thread(target=signal_at_event, args=(job,), daemon=True) for job in submitted.values() if job.signal
    ]
    for t in threads:
        t.start()
    yield submitted
    for t in threads:
        t.join(timeout=1)
    for job in submitted.values():  # a test that failed early leaves its job behind
        if show_job(job.id).get("JobState") not in ENDED:
            subprocess.run(["scancel", job.id], capture_output=True)


@pytest.fixture(scope="session")
def reference(jobs, data_dir, tmp_path_factory) -> dict[int, Path]:
    """The same training without SLURM at world sizes 1 and 2 (runs while the cluster works)."""
    out = tmp_path_factory.mktemp("reference")
    train(1, out / "ws1", data_dir, *TRAIN)
    train(2, out / "ws2", data_dir, *TRAIN)
    return {1: out / "ws1", 2: out / "ws2"}


def assert_same_training(run_dir: Path, ref_dir: Path) -> dict:
    res, ref = results(run_dir), results(ref_dir)
    assert {k: res[k] for k in SAME} == {k: ref[k] for k in SAME}
    assert max_param_diff(final_model(run_dir), final_model(ref_dir)) == 0.0
    return res


# ---------------------------------------------------------------------- the tests against SLURM
@pytest.mark.slurm
@pytest.mark.early
def test_the_cluster_takes_every_job(jobs):
    """Runs first in the session (conftest: the `early` marker): the one-node cluster then works through
    these jobs (about 2.5 minutes of it) while the other tests run, and the tests below read the outcome."""
    for name, job in jobs.items():
        assert re.fullmatch(r"\d+(_\d+)?", job.id), name  # an array element: ARRAY_ELEMENT
        assert show_job(job.id).get("JobState") in {"PENDING", "RUNNING", "COMPLETING", "COMPLETED"}, name


@pytest.mark.slurm
def test_sweep_as_one_array_per_world_size_each_element_its_variant_collected_in_one_table(jobs, reference):
    for variant in ("", "static-graph/"):
        for n in (1, 2):
            job = jobs[f"{variant}ws{n}"]
            job.completed()
            assert f"1 node(s) x {n} rank(s)" in job.log_text()
            res = assert_same_training(job.run_dir, reference[n])
            assert res["world_size"] == n and res["static_graph"] == (variant == "static-graph/")
    # The scaling harness reads the sweep's folder as it is: one report per variant, and one table of all.
    sweep = jobs["ws1"].run_dir.parent.parent
    run_cmd([sys.executable, "-m", "ddp_mnist", "scale", "--from-runs", str(sweep)], base_env(), timeout=120)
    for variant in ("no-static-graph", "static-graph"):
        with open(sweep / variant / "scaling.csv") as f:
            assert [row["world_size"] for row in csv.DictReader(f)] == ["1", "2"]
    with open(sweep / "scaling.csv") as f:
        assert sorted((row["variant"], row["world_size"]) for row in csv.DictReader(f)) == [
            ("no-static-graph", "1"),
            ("no-static-graph", "2"),
            ("static-graph", "1"),
            ("static-graph", "2"),
        ]


@pytest.mark.slurm
def test_single_node_script_torchrun_topology(jobs, reference):
    """The sweep's world-size-2 job is slurm/single_node.sh as is: TOPOLOGY=torchrun, 2 ranks."""
    job = jobs["ws2"]
    job.completed()
    res = assert_same_training(job.run_dir, reference[2])
    assert (res["world_size"], res["backend"], res["restarts"]) == (2, "gloo", 0)
    log = job.log_text()
    assert "torchrun topology, 1 node(s) x 2 rank(s)" in log and "world size 2 (torchrun)" in log


@pytest.mark.slurm
def test_single_node_script_srun_topology_one_task_per_rank(jobs, reference):
    job = jobs["srun"]
    job.completed()
    res = assert_same_training(job.run_dir, reference[2])
    assert (res["world_size"], res["backend"]) == (2, "gloo")
    log = job.log_text()
    assert "srun topology" in log and "world size 2 (srun)" in log  # the package read SLURM_PROCID & co


@pytest.mark.slurm
def test_preflight_runs_doctor_in_the_job_before_training(jobs, reference):
    job = jobs["preflight"]
    job.completed()
    log = job.log_text()
    doctor = log.index("ddp-mnist: preflight: ddp-mnist doctor on every rank, before training")
    assert "ddp-mnist doctor: 1 node(s), 2 rank(s), backend gloo" in log[doctor:], log[-4000:]
    assert "all-reduce of 4 MiB over 2 ranks: " in log and "nothing to leave out" in log, log[-4000:]
    assert log.index("nothing to leave out") < log.index("world size 2 (torchrun)"), log[-4000:]  # then training
    assert_same_training(job.run_dir, reference[2])


@pytest.mark.slurm
@pytest.mark.parametrize(
    "name, signal_name", [("steps_usr1", "SIGUSR1"), ("batch_usr2", "SIGUSR2"), ("user_requeue", "SIGTERM")]
)
def test_preempted_job_checkpoints_requeues_and_finishes_the_same(jobs, reference, name, signal_name):
    job = jobs[name]
    job.completed()
    log = job.log_text()
    assert job.signalled_at_step is not None, f"the job never paused at step {PAUSE}:\n{log[-3000:]}"
    assert job.signal_error is None, f"{' '.join(job.signal)}: {job.signal_error}"
    assert job.info["Restarts"] == "1", (
        f"the job was not requeued exactly once ({job.info}; signalled after step "
        f"{job.signalled_at_step} of {STEPS}):\n{log[-4000:]}"
    )
    stopped = re.search(rf"{signal_name} received: checkpointing at step (\d+)", log)
    assert stopped, f"no checkpoint on {signal_name}:\n{log[-4000:]}"
    step = int(stopped.group(1))
    assert step == PAUSE
    assert f"resumed from {job.run_dir}/checkpoints/step-{step:08d}.pt" in log
    if signal_name != "SIGTERM":  # the batch script requeued the job, saying so in one line, and no traceback
        requeued = re.findall(
            r"ddp-mnist: the ranks stopped on (\S+) at step (\d+) with a checkpoint: "
            rf"requeueing SLURM job {job.id}$",
            log,
            re.M,
        )
        assert requeued == [(signal_name, str(PAUSE))], log[-4000:]
        assert "requeue of SLURM job" not in log, log[-4000:]
    # No traceback on any of them: also not the torchrun agent's SignalException on SIGTERM (commands/torchrun.py).
    assert "Traceback" not in log, log[-4000:]
    if signal_name == "SIGTERM":
        assert "ddp-mnist: torchrun got SIGTERM and stopped its workers" in log, log[-4000:]
    if name == "batch_usr2":  # only the batch shell was signalled: it passed the signal on
        assert "batch script got SIGUSR2, passing it to the ranks" in log
    if name == "steps_usr1":  # W&B (offline) kept both attempts, as one run
        attempts = sorted((job.run_dir / "wandb").glob("offline-run-*"))
        assert len(attempts) == 2 and len({a.name.rsplit("-", 1)[1] for a in attempts}) == 1, attempts
    res = assert_same_training(job.run_dir, reference[2])
    assert res["restarts"] == 1


@pytest.mark.slurm
def test_a_signal_after_the_training_is_complete_leaves_the_job_completed(jobs, reference):
    job = jobs["late_usr1"]
    job.completed()  # COMPLETED 0:0, not FAILED by the torchrun agent's SignalException
    assert job.signalled_at_step == STEPS and job.signal_error is None, job
    assert job.info["Restarts"] == "0" and "Traceback" not in job.log_text(), job.log_text()[-4000:]
    assert_same_training(job.run_dir, reference[2])


@pytest.mark.slurm
def test_without_a_warning_signal_the_job_requeues_before_its_time_limit_until_done(jobs, reference):
    """`--time=1` and no `--signal`: rank 0 reads the job's end time and, before it, the ranks checkpoint and the
    script requeues the job, again and again; it ends COMPLETED (an attempt that reached its limit would have
    ended the job TIMEOUT) with the weights of an uninterrupted run."""
    job = jobs["time_limit"]
    job.completed()
    log = job.log_text()
    stops = re.findall(
        rf"^ddp-mnist: the ranks stopped on the time limit at step (\d+) with a checkpoint: requeueing SLURM job"
        rf" {job.id}$",
        log,
        re.M,
    )
    assert len(stops) >= 2 and job.info["Restarts"] == str(len(stops)), log[-4000:]
    assert [int(s) for s in stops] == sorted(int(s) for s in stops) and int(stops[-1]) < STEPS
    assert (
        len(re.findall(rf"^time limit: the job ends at .* \(SLURM job {job.id}, in \d+ s\)", log, re.M))
        == len(stops) + 1
    )
    assert "Traceback" not in log, log[-4000:]
    assert_same_training(job.run_dir, reference[1])


@pytest.mark.slurm
def test_a_plain_sbatch_wrap_job_never_times_out_and_ends_as_an_uninterrupted_run(jobs, slurm_env, reference):
    """`sbatch --time=1 --requeue --wrap "python -m ddp_mnist train --resume --run-dir X ..."`: each attempt
    checkpoints before the limit, says so in one line and requeues itself (rank 0 runs `scontrol requeue`).
    Resubmitted until results.json exists, as a user would; requeueing itself, it needs one submission."""
    job = jobs["plain_time_limit"]
    for _ in range(4):
        info = job.wait()
        assert info["JobState"] != "TIMEOUT", job.log_text()[-4000:]
        if (job.run_dir / "results.json").exists():
            break
        job = submit_plain(job.name, job.run_dir.parent, {**slurm_env, "DDP_MNIST_FAULT": f"pace={PACE_S}:step=1"})
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.log_text()[-4000:]
    log = job.log_text()
    requeues = re.findall(rf"^ddp-mnist: requeue of SLURM job {job.id}: requested\b.*$", log, re.M)
    assert len(requeues) >= 2 and info["Restarts"] == str(len(requeues)), log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert_same_training(job.run_dir, reference[1])


@pytest.mark.slurm
def test_a_signalled_array_element_requeues_alone_and_both_train_as_uninterrupted(jobs, reference):
    """`sbatch --array=0-1 slurm/single_node.sh`: each element in its own run folder; the warning signal to element
    1 requeues that element only (`scontrol requeue <array>_1`), which resumes its own checkpoint."""
    first, second = jobs["array_0"], jobs["array_1"]
    first.completed()
    second.completed()
    assert second.signalled_at_step == PAUSE and second.signal_error is None, second
    assert (first.info["Restarts"], second.info["Restarts"]) == ("0", "1"), (first.info, second.info)
    requeued = (
        rf"^ddp-mnist: the ranks stopped on SIGUSR1 at step \d+ with a checkpoint: requeueing SLURM job {second.id}$"
    )
    assert re.search(requeued, second.log_text(), re.M), second.log_text()[-4000:]
    assert "requeueing" not in first.log_text() and first.run_dir != second.run_dir
    for job in (first, second):
        assert_same_training(job.run_dir, reference[2])

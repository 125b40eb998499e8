"""Bad input gets a clear error, exit status 2, and nothing on disk changes: damaged IDX files, an
unreadable data folder, a run folder that cannot be written, checkpoints of another job, and nonsense
option values. (tests/test_core.py covers missing data, a corrupt file, a batch that does not split
over the ranks, and nccl without a GPU; tests/test_config.py the validation messages themselves.)

Most cases run `ddp-mnist train` inside the pytest process (`cli.main`: the same code as the command,
minus the ~3 s of starting python and importing torch); the permission cases need their own process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from conftest import base_env, ddp_mnist_cmd, free_port, rank_env, run_cmd, train, train_cmd

from ddp_mnist.commands.cli import main
from ddp_mnist.config.validation import rank_differences
from ddp_mnist.data.raw_files import RAW_FILES, prepare_mnist
from ddp_mnist.model import build_model

JOB = ("--recipe", "tutorial", "--max-steps", "10", "--checkpoint-every", "5")
# Resume the job with steps left (a finished job has nothing to resume: it says so and exits 0).
RESUME = ("--max-steps", "20", "--resume")


@pytest.fixture
def cli(capsys):
    """`ddp-mnist train ARGS` in this process: returns (exit status, stderr). The training code sets up
    the root logger for its console; the test's logging is put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*args: str) -> tuple[int, str]:
        status = main(["train", "--no-progress", *args])
        return status, capsys.readouterr().err

    yield run
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def job(tmp_path_factory, data_dir) -> Path:
    """A finished job: config, metrics, results and checkpoints at steps 5 and 10."""
    run = tmp_path_factory.mktemp("job") / "run"
    train(1, run, data_dir, *JOB)
    return run


@pytest.fixture
def job_copy(job, tmp_path) -> Path:
    return shutil.copytree(job, tmp_path / "run")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and its SHA-256: equal snapshots mean nothing was written."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fails_clearly(status: int, stderr: str, *fragments: str) -> None:
    assert status == 2, f"exit status {status}, expected 2\n{stderr[-3000:]}"
    assert stderr.startswith("ddp-mnist: error: "), stderr[-3000:]
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in:\n{stderr[-3000:]}"


# ------------------------------------------------------------------------------------------------
# Damaged IDX files: found before anything is written
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw(data_dir) -> Path:
    """The four good decompressed files (prepare_mnist decompresses into a cache, never into /work/shared)."""
    return prepare_mnist(str(data_dir)) / "MNIST" / "raw"


def data_with(folder: Path, raw: Path, name: str, content: bytes) -> Path:
    """A data folder whose file `name` holds `content`; its other files link to the good ones."""
    target = folder / "MNIST" / "raw"
    target.mkdir(parents=True)
    for other in RAW_FILES:
        if other != name:
            (target / other).symlink_to(raw / other)
    (target / name).write_bytes(content)
    return folder


DAMAGED_IDX = {  # file, damage, what the message says
    "wrong magic number": (
        "t10k-labels-idx1-ubyte",
        lambda b: struct.pack(">I", 2051) + b[4:],
        "is not an IDX label file (magic number 2051, expected 2049)",
    ),
    "truncated": (
        "t10k-images-idx3-ubyte",
        lambda b: b[: -10 * 28 * 28 - 100],
        "is truncated or padded: 7,832,076 bytes, its header says 7,840,016",
    ),
    "shorter than its header": (
        "t10k-labels-idx1-ubyte",
        lambda b: b[:5],
        "is truncated (5 bytes, shorter than its header)",
    ),
    "image and label counts differ": (
        "t10k-images-idx3-ubyte",
        lambda b: b[:4] + struct.pack(">I", 9999) + b[8:-784],
        "holds 9999 images but t10k-labels-idx1-ubyte holds 10000 labels",
    ),
}


@pytest.mark.process
@pytest.mark.parametrize("case", list(DAMAGED_IDX))
def test_damaged_idx_file(case, raw, job_copy, tmp_path, cli):
    name, damage, message = DAMAGED_IDX[case]
    data = data_with(tmp_path / "data", raw, name, damage((raw / name).read_bytes()))
    before = snapshot(job_copy)
    status, err = cli("--data-dir", str(data), "--run-dir", str(job_copy), *JOB, *RESUME)
    fails_clearly(status, err, str(data / "MNIST" / "raw" / name), message)
    assert snapshot(job_copy) == before


# ------------------------------------------------------------------------------------------------
# Permissions. Tests run as root here, and root reads and writes through any mode bits; the command
# then runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv), so the bits apply to it.
# ------------------------------------------------------------------------------------------------
def without_root_override(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True) if shutil.which("setpriv") else None
    if probe is None or probe.returncode:
        pytest.skip(
            "running as root, and setpriv (util-linux) cannot drop the capabilities that bypass "
            f"permission bits here: {probe.stderr.strip() if probe else 'setpriv not found'}"
        )
    return [*prefix, *cmd]


@pytest.mark.process
def test_unreadable_data_folder(raw, tmp_path):
    data = data_with(tmp_path / "data", raw, "t10k-labels-idx1-ubyte", (raw / "t10k-labels-idx1-ubyte").read_bytes())
    data.chmod(0)
    try:
        proc = run_cmd(
            without_root_override(train_cmd(1, "--data-dir", str(data), "--run-dir", str(tmp_path / "run"))),
            base_env(),
            check=False,
            timeout=120,
        )
    finally:
        data.chmod(0o755)
    fails_clearly(proc.returncode, proc.stderr, f"data folder {data} is not readable")
    assert not (tmp_path / "run").exists()


@pytest.mark.process
def test_run_folder_that_cannot_be_written(data_dir, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = run_cmd(
            without_root_override(train_cmd(1, "--run-dir", str(parent / "run"), *JOB)),
            base_env(data_dir),
            check=False,
            timeout=120,
        )
    finally:
        parent.chmod(0o755)
    fails_clearly(proc.returncode, proc.stderr, f"run folder {parent / 'run'} cannot be written (Permission denied)")
    assert not any(parent.iterdir())


# ------------------------------------------------------------------------------------------------
# Run folders and checkpoints of another job
# ------------------------------------------------------------------------------------------------
@pytest.mark.process
def test_existing_job_is_not_overwritten_without_resume(job_copy, data_dir, cli):
    before = snapshot(job_copy)
    status, err = cli("--run-dir", str(job_copy), *JOB)
    fails_clearly(status, err, f"run folder {job_copy} already holds a training job", "--resume")
    assert snapshot(job_copy) == before


@pytest.mark.process
@pytest.mark.parametrize(
    "option, value, saved, now",
    [
        ("--model", "cnn", "'mlp'", "'cnn'"),  # a checkpoint of another model
        ("--batch-size", "200", "100", "200"),  # incompatible options
        ("--seed", "1", "0", "1"),
    ],
)
def test_checkpoint_of_another_job(option, value, saved, now, job_copy, data_dir, cli):
    before = snapshot(job_copy)
    status, err = cli("--run-dir", str(job_copy), *JOB, option, value, "--resume")
    field = option[2:].replace("-", "_")
    fails_clearly(
        status,
        err,
        f"--resume {job_copy}: these settings would change the run's training: {field}: {saved} in the run, {now} now",
        "start a new run",
    )
    assert snapshot(job_copy) == before
    # The run's config.json edited to agree: the checkpoint's own config still says which job it belongs to.
    config = json.loads((job_copy / "config.json").read_text())
    (job_copy / "config.json").write_text(json.dumps({**config, field: json.loads(now.replace("'", '"'))}))
    before = snapshot(job_copy)
    status, err = cli("--run-dir", str(job_copy), *JOB, *RESUME)
    fails_clearly(
        status,
        err,
        f"checkpoint {job_copy / 'checkpoints' / 'step-00000010.pt'} belongs to a different "
        f"training job ({field}: {saved} in the checkpoint, {now} now)",
        "a new --run-dir",
    )
    assert snapshot(job_copy) == before  # config.json included: it is saved only after a successful resume


@pytest.mark.process
def test_checkpoint_holding_another_network(job_copy, data_dir, cli):
    """Same options, other weights (a file copied in from another job): loading fails, naming the file."""
    newest = job_copy / "checkpoints" / "step-00000010.pt"
    state = torch.load(newest, weights_only=True)
    state["model"] = build_model("cnn").state_dict()
    torch.save(state, newest)
    meta = json.loads(newest.with_suffix(".json").read_text())
    meta["sha256"] = hashlib.sha256(newest.read_bytes()).hexdigest()  # an intact file: only its contents are wrong
    newest.with_suffix(".json").write_text(json.dumps(meta))
    before = snapshot(job_copy)
    status, err = cli("--run-dir", str(job_copy), *JOB, *RESUME)
    fails_clearly(status, err, f"checkpoint {newest} does not fit this job", "Missing key(s)")
    assert snapshot(job_copy) == before


@pytest.mark.process
def test_no_usable_checkpoint_left(job_copy, data_dir, cli):
    for pt in (job_copy / "checkpoints").glob("step-*.pt"):
        pt.write_bytes(pt.read_bytes()[:1000])
    before = snapshot(job_copy)
    status, err = cli("--run-dir", str(job_copy), *JOB, *RESUME)
    fails_clearly(
        status,
        err,
        f"no usable checkpoint in {job_copy / 'checkpoints'}",
        "step-00000005.pt (corrupt",
        "step-00000010.pt (corrupt",
    )
    assert snapshot(job_copy) == before


# ------------------------------------------------------------------------------------------------
# Nonsense option values: rejected before anything is created
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (("--batch-size", "-100"), "--batch-size must be a positive number, got -100"),
        (("--keep-checkpoints", "0"), "--keep-checkpoints must be a positive number, got 0"),
        (("--timeout-s", "0"), "--timeout-s must be a positive number, got 0.0"),
        (("--timeout-s", "inf"), "--timeout-s must be a positive number, got inf"),
        (("--lr", "nan"), "--lr must be a positive number, got nan"),
        (("--lr", "inf"), "--lr must be a positive number, got inf"),
        (("--grad-clip", "nan"), "--grad-clip must be >= 0, got nan"),
        (("--grad-accum", "0"), "--grad-accum must be a positive number, got 0"),
        (("--log-every", "0"), "--log-every must be a positive number, got 0"),
        (("--num-workers", "-1"), "--num-workers must be >= 0, got -1"),
        (("--data-path", "disk"), "--data-path 'disk' is not valid; choose one of auto, loader, resident"),
        (("--schedule", "cosine"), "--schedule 'cosine' is not valid; choose one of constant, onecycle"),
        (("--normalize", "zscore"), "--normalize 'zscore' is not valid; choose one of unit, standard"),
    ],
)
def test_nonsense_option_value(args, message, tmp_path, cli):
    status, err = cli("--run-dir", str(tmp_path / "run"), *args)
    fails_clearly(status, err, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [("--batch-size", "ten"), ("--epochs", "1.5"), ("--lr", "fast")])
def test_option_of_the_wrong_type(args, tmp_path, cli, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli("--run-dir", str(tmp_path / "run"), *args)
    assert exit_.value.code == 2
    assert f"argument {args[0]}: invalid" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_world_size_larger_than_the_dataset(tmp_path, cli, monkeypatch):
    # As a launcher would set it; the check comes before any process group is formed.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "60001")
    status, err = cli("--run-dir", str(tmp_path / "run"))
    fails_clearly(status, err, "world size 60001 is larger than the 60,000 training images")
    assert not (tmp_path / "run").exists()


@pytest.mark.process
def test_torchrun_failure_summary_names_the_error(tmp_path, data_dir):
    """torchrun's summary said `error_file: <N/A>` for an error the CLI turns into exit status 2; the error
    now goes into torch's elastic error file, and the summary shows it."""
    cmd = ddp_mnist_cmd(1, "train", "--no-progress", "--run-dir", str(tmp_path / "run"), "--epochs", "0", torchrun=True)
    proc = run_cmd(cmd, base_env(data_dir), check=False)  # one rank: its error is the root cause
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    root_cause = output[output.index("Root Cause") :]
    assert "error_file: <N/A>" not in root_cause, root_cause
    assert "exitcode  : 2" in root_cause
    assert "ddp_mnist.errors.ConfigError: --epochs must be a positive number, got 0" in root_cause, root_cause


# ------------------------------------------------------------------------------------------------
# Ranks launched with different settings
# ------------------------------------------------------------------------------------------------
def test_rank_differences_name_each_setting_and_its_ranks():
    same = {"lr": 0.01, "seed": 0, "max_steps": 10}
    per_rank = [same, {**same, "lr": 0.02}, same, {**same, "lr": 0.02, "max_steps": 20}]
    assert rank_differences(per_rank) == [
        "--lr: 0.01 on ranks 0, 2; 0.02 on ranks 1, 3",
        "--max-steps: 10 on ranks 0, 1, 2; 20 on rank 3",
    ]
    assert rank_differences([same, dict(same)]) == []


@pytest.mark.process
@pytest.mark.parametrize("flag, values", [("--lr", ("0.01", "0.02")), ("--max-steps", ("20", "30"))])
def test_ranks_with_different_settings_stop_before_any_step(data_dir, tmp_path, flag, values):
    """The reported cases: ranks launched with different --lr trained silently to a result results.json
    misreported; different --max-steps ended in a C++ abort. Every rank now ends with one line naming the
    setting and the ranks, exit 2, before any step (and before the run folder is touched)."""
    port = free_port()
    procs = []
    for rank, value in enumerate(values):
        env = rank_env(data_dir, rank, port)
        cmd = train_cmd(1, "--run-dir", str(tmp_path / "run"), *JOB, "--device", "cpu", flag, value)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=120) for proc in procs]
    name = flag.lstrip("-")
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 2, out + err
        assert f"the ranks were launched with different settings: --{name}: {values[0]} on rank 0; " in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# A port held by another program: every rank fails within --timeout-s, in one line
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def held_port():
    """A port held by another program that accepts connections and never says a word (a web server, a
    forgotten notebook); the connections stay open until the test ends."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the test closed the server
            while True:
                accepted.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for connection in accepted:
        connection.close()


@pytest.mark.process
@pytest.mark.parametrize("rank", [0, 1])
def test_a_port_held_by_another_program_fails_every_rank_within_the_timeout(data_dir, tmp_path, held_port, rank):
    """Rank 0 cannot serve the store there: it says so at once. Another rank reaches the other program, whose
    silence torch's own timeout did not end (the rank hung for good): it now fails after --timeout-s."""
    env = rank_env(data_dir, rank, held_port)
    cmd = train_cmd(1, "--run-dir", str(tmp_path / "run"), *JOB, "--device", "cpu", "--timeout-s", "5")
    proc = run_cmd(cmd, env, check=False, timeout=120)  # far beyond the 5 s: a hang fails here
    if rank == 0:
        expected = f"port {held_port} (MASTER_PORT) is in use by another program on 127.0.0.1"
    else:
        expected = f"rank 1 got no answer from the job's store at 127.0.0.1:{held_port} within 5 s (--timeout-s)"
    fails_clearly(proc.returncode, proc.stderr, expected)
    assert len(proc.stderr.splitlines()) == 1, proc.stderr

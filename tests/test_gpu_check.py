"""benchmarks/gpu_check.sh, the check that runs when a GPU is lent (once, for minutes): its CPU rehearsal runs
every part and writes every file; its summary reads failures, timeouts and the bench's rows right; the bench
leaves the rows it measured when it is stopped half-way."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, base_env

from ddp_mnist.commands.cli import main as ddp_mnist_main
from ddp_mnist.data.raw_files import find_data_root
from ddp_mnist.training import bench

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

FILES = {
    "versions": ["versions.txt", "nvidia-smi.txt"],
    "gpu-tests": ["gpu-tests.log", "gpu-tests.xml"],
    "bench-mlp": ["bench-gpu-mlp.md", "bench-gpu-mlp.json"],
    "bench-cnn": ["bench-gpu-cnn.md", "bench-gpu-cnn.json"],
    "startup": ["startup.json"],
}


@pytest.mark.process
def test_rehearsal_runs_every_part_and_writes_every_file(tmp_path, monkeypatch):
    """`bash benchmarks/gpu_check.sh --rehearse`, as CI runs it: no DDP_MNIST_DATA (the package's own MNIST,
    as `ddp-mnist train` finds it), output under $OUT, the committed files in benchmarks/ untouched."""
    out = tmp_path / "out"
    env = base_env(None, OUT=str(out))
    env.pop("DDP_MNIST_DATA", None)
    committed = {p.name: p.read_bytes() for p in (ROOT / "benchmarks").iterdir() if p.is_file()}
    started = time.monotonic()
    command = ["bash", "benchmarks/gpu_check.sh", "--rehearse"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    print(f"gpu_check.sh --rehearse: {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr + (out / "summary.md").read_text()
    for part, files in FILES.items():
        assert f"| {part} | ok" in proc.stdout, proc.stdout
        for name in [*files, f"{part}.log"]:
            assert (out / name).stat().st_size > 0, name
    assert "every part passed" in proc.stdout and (out / "summary.md").read_text() in proc.stdout
    assert {p.name: p.read_bytes() for p in (ROOT / "benchmarks").iterdir() if p.is_file()} == committed

    monkeypatch.chdir(ROOT)  # as the script finds the data: from the checkout, without DDP_MNIST_DATA
    monkeypatch.delenv("DDP_MNIST_DATA", raising=False)
    versions = dict(line.split(": ", 1) for line in (out / "versions.txt").read_text().splitlines())
    assert versions["torch"] == torch.__version__ and versions["DDP_MNIST_DATA"] == "unset"
    assert versions["data"] == str(find_data_root(None).resolve())
    if not torch.cuda.is_available():
        assert gpu_check.junit_counts(out / "gpu-tests.xml") == {"passed": 0, "failures": 0, "errors": 0, "skipped": 9}
    for name in ("bench-gpu-mlp.json", "bench-gpu-cnn.json"):
        report = json.loads((out / name).read_text())
        assert report["torch_version"] == torch.__version__ and len(report["rows"]) == 5
        assert not any(note.startswith("partial") for note in report["notes"])
    start = json.loads((out / "startup.json").read_text())
    assert start["steps"] == 5 and 0 < start["train_seconds"] < start["wall_seconds"]
    assert start["startup_seconds"] == pytest.approx(start["wall_seconds"] - start["train_seconds"])
    assert "| start-up: `ddp-mnist train` wall minus training time | measured | " in proc.stdout


# ------------------------------------------------------------------------------ the summary
def write_parts(out: Path, *lines: str) -> None:
    (out / "parts.tsv").write_text("".join(line + "\n" for line in lines))


def test_summary_reports_failed_timed_out_and_missing_parts(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "gpu-tests.log").write_text("x")
    (tmp_path / "gpu-tests.xml").write_text(
        '<testsuites><testsuite tests="9" failures="1" errors="0" skipped="0"/></testsuites>'
    )
    write_parts(
        tmp_path,
        "versions\t0\t3\t20\ta.txt",
        "gpu-tests\t124\t130\t120\tgpu-tests.log gpu-tests.xml",
        "bench-mlp\t137\t70\t70\tempty.txt",
        "startup\t2\t1\t30\tnone.json",
    )
    assert gpu_check.summary(tmp_path, 200, rehearse=False) == 1
    text = capsys.readouterr().out
    assert "| versions | ok | 3 | 20 | a.txt |" in text
    assert "| gpu-tests | TIMED OUT (124): 8 passed, 1 failures | 130 | 120 |" in text
    assert "| bench-mlp | TIMED OUT (137); missing or empty: empty.txt |" in text
    assert "| startup | FAILED (exit 2); missing or empty: none.json |" in text
    assert "FAILED: gpu-tests, bench-mlp, startup" in text and (tmp_path / "summary.md").read_text() == text

    write_parts(tmp_path, "versions\t0\t3\t20\ta.txt")
    assert gpu_check.summary(tmp_path, 3, rehearse=False) == 0


def test_a_skipped_gpu_test_fails_a_gpu_run_but_not_a_rehearsal(tmp_path, capsys):
    for name in ("gpu-tests.log", "gpu-tests.xml"):
        (tmp_path / name).write_text('<testsuite tests="9" failures="0" errors="0" skipped="9"/>')
    write_parts(tmp_path, "gpu-tests\t0\t5\t120\tgpu-tests.log gpu-tests.xml")
    assert gpu_check.summary(tmp_path, 5, rehearse=True) == 0
    assert gpu_check.summary(tmp_path, 5, rehearse=False) == 1
    assert "| gpu-tests | ok: 9 skipped (skipped on a GPU run) |" in capsys.readouterr().out


def bench_row(recipe: str, variant: str, rate: float | None, model: str = "mlp", **fields) -> dict:
    """A row of `ddp-mnist bench --out X.json`: 10 epochs at RATE samples/s, or not measured (RATE None)."""
    row = dict(model=model, recipe=recipe, variant=variant, samples_per_second=rate, note="")
    if rate:
        row.update(epochs=10.0, epoch_seconds=60_000 / rate, seconds_to_target=None)
    return {**row, **fields}


def test_targets_read_the_bench_rows_and_the_start_up_run():
    rows = [
        bench_row("tutorial", "tutorial loop (as written)", 11_000.0, epochs=1.0),
        bench_row("tutorial", "resident, captured", 2_000_000.0),  # 10 epochs in 0.3 s
        bench_row("tutorial", "resident, captured, DDP ws=1", 1_800_000.0),  # 90%
        bench_row("fast", "resident, captured", 5_000_000.0, epochs=6.0, seconds_to_target=0.04),
        bench_row("fast", "resident, captured, DDP ws=1", 4_900_000.0, epochs=6.0, seconds_to_target=0.05),
        bench_row("fast", "resident, captured", 900_000.0, model="cnn", epochs=4.0, note="capture failed: ran eagerly"),
    ]
    start = {"startup_seconds": 4.5, "wall_seconds": 5.0, "train_seconds": 0.5}
    got = {what: (measured, met) for what, _, measured, met in gpu_check.targets(rows, start)}
    assert got == {
        "MLP, tutorial recipe as written: training time": ("0.3 s (10 epochs)", "yes"),
        "MLP, fast recipe: training time to 98.0%": ("0.04 s", "yes"),
        "MLP, batch 512 (fast recipe): throughput": ("5,000,000 samples/s", "yes"),
        "CNN, fast recipe: training time to 99.0%": ("not reached in 4 epochs (capture failed: ran eagerly)", "NO"),
        "MLP, fast recipe: samples/s of DDP ws=1 (NCCL) captured / no DDP captured": ("98.0%", "yes"),
        "MLP, tutorial recipe: samples/s of DDP ws=1 (NCCL) captured / no DDP captured": ("90.0%", "NO"),
        "the tutorial's loop as written (MLP)": ("11,000 samples/s, 5.45 s/epoch", "-"),
        "start-up: `ddp-mnist train` wall minus training time": ("4.5 s (wall 5 s, training 0.5 s)", "-"),
    }
    # Without a GPU the captured rows are n/a, and the table says why; nothing measured: "not measured".
    cpu = [bench_row("fast", "resident, captured", None, note="n/a: CUDA graphs need a GPU")]
    got = {what: (measured, met) for what, _, measured, met in gpu_check.targets(cpu, None)}
    assert got["MLP, fast recipe: training time to 98.0%"] == ("n/a: CUDA graphs need a GPU", "n/a")
    assert got["CNN, fast recipe: training time to 99.0%"] == ("not measured", "n/a")
    assert got["start-up: `ddp-mnist train` wall minus training time"] == ("not measured", "n/a")


# ------------------------------------------------------------------------------ the bench, stopped half-way
def test_bench_files_hold_the_rows_measured_before_a_stop(tmp_path, monkeypatch):
    """`ddp-mnist bench --out` rewrites its files after every row: the check's time budget may stop it."""
    measured = []

    def fake_job(model, recipe, variant, settings, device):
        if len(measured) == 2:
            raise KeyboardInterrupt  # as the budget's signal would stop it
        measured.append(variant.label)
        return bench.Row(model, recipe, variant.label, 512, 1.0, 1000.0, 60.0, None, 98.0, 50.0)

    monkeypatch.setattr(bench, "run_job", fake_job)
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    argv = ["bench", "--models", "mlp", "--recipes", "fast", "--device", "cpu", "--out", str(md), "--out", str(js)]
    with pytest.raises(KeyboardInterrupt):
        ddp_mnist_main(argv)
    report = json.loads(js.read_text())
    assert [r["variant"] for r in report["rows"]] == measured == ["tutorial loop (as written)", "loader, eager"]
    assert report["notes"][-1] == "partial: 2 of 5 variants measured so far"
    assert "| mlp | fast | loader, eager | 512 |" in md.read_text() and "partial: 2 of 5" in md.read_text()
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "bench.md"]  # no temporary files left


@pytest.mark.process
def test_gpu_check_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        message = "shellcheck is not installed (apt-get install shellcheck)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    proc = subprocess.run(["shellcheck", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

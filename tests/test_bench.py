"""`ddp-mnist bench` runs end to end in quick mode (real training, real data, a real 1-rank gloo group)
and prints the table it promises; bad arguments fail with a clear message."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import ROOT, base_env, run_cmd

pytestmark = pytest.mark.process  # every test here starts processes (docs/testing.md)

ROWS = (
    "tutorial loop (as written)",
    "loader, eager",
    "resident, eager",
    "resident, captured",
    "resident, eager, DDP ws=1",
)
HEADER = "| model | recipe | variant | batch | epochs | samples/s | s/epoch | s to target | test acc |"


def table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and line != HEADER and "| --- |" not in line]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_bench_quick_prints_the_table_and_writes_json(tmp_path, data_dir):
    out, markdown = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "ddp_mnist",
            "bench",
            "--quick",
            "--models",
            "mlp",
            "--recipes",
            "fast",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--out",
            str(markdown),
        ],
        base_env(data_dir),
        timeout=300,
    )
    text = proc.stdout
    assert HEADER in text
    assert f"torch {torch.__version__}" in text and "Device: CPU" in text
    rows = table_rows(text)
    assert [r[2] for r in rows] == list(ROWS), text
    by_variant = {r[2]: r for r in rows}
    for label in ROWS:
        cells = by_variant[label]
        assert cells[0] == "mlp"
        if label == "resident, captured":
            assert cells[5:] == ["n/a"] * 4  # no GPU here
        else:
            assert float(cells[5].replace(",", "")) > 0 and float(cells[6]) > 0  # samples/s, s/epoch
            assert cells[7].startswith("not reached")  # 20 steps do not reach 98%
            assert cells[8].endswith("%")
    assert by_variant["tutorial loop (as written)"][3] == "100" and by_variant["loader, eager"][3] == "512"
    assert "CUDA graph capture" in text and "n/a: CUDA graphs need a GPU" in text
    assert "DDP overhead (world size 1, gloo" in text and "mlp/fast" in text
    assert "x the loader path" in text and "x the tutorial loop" in text

    assert markdown.read_text() in text  # the printed table, as written
    report = json.loads(out.read_text())
    assert report["torch_version"] == torch.__version__
    assert [r["variant"] for r in report["rows"]] == list(ROWS)
    assert report["settings"]["max_steps"] == 20 and report["settings"]["warmup_steps"] == 2
    timed = [r for r in report["rows"] if r["samples_per_second"]]
    assert len(timed) == 4 and all(r["batch"] and 0 < r["test_accuracy"] <= 100 for r in timed)
    trainer = [r for r in timed if r["variant"] != "tutorial loop (as written)"]
    assert all(
        r["flops_per_sample"] == 2_351_360
        and r["achieved_tflops"] == pytest.approx(r["flops_per_sample"] * r["samples_per_second"] / 1e12)
        and r["mfu"] is None
        for r in trainer
    )
    assert "FLOPs per sample (forward + backward, FlopCounterMode): mlp 2.35 M" in text


def test_bench_rejects_unknown_model():
    proc = run_cmd([sys.executable, "-m", "ddp_mnist", "bench", "--models", "resnet"], base_env(), check=False)
    assert proc.returncode == 2 and "choose from mlp, cnn" in proc.stderr


def test_vs_plain_ddp_prints_a_row_per_world_size(tmp_path, data_dir):
    """benchmarks/vs_plain_ddp.py runs the plain DDP script and ddp-mnist side by side (a few steps here)."""
    out = tmp_path / "vs.md"
    script = str(ROOT / "benchmarks" / "vs_plain_ddp.py")
    cmd = [sys.executable, script, "--rounds", "1", "--max-steps", "5", "--data-dir", str(data_dir), "--out", str(out)]
    proc = run_cmd(cmd, base_env(data_dir), timeout=240)
    assert "| world size | plain DDP samples/s |" in proc.stdout
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2, out.read_text()
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 7 and cells[3].endswith("x") and float(cells[6]) > 0, row
    assert "logical cores" in proc.stdout  # the machine is named

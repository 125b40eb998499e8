"""`ddp-mnist bench --out` when it is stopped half-way (benchmarks/gpu_check.sh gives it a time budget): the
files hold the rows it measured."""

from __future__ import annotations

import json
import os

import pytest

from ddp_mnist.commands.cli import main as ddp_mnist_main
from ddp_mnist.training import bench


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

"""`ddp-mnist scale`: a real sweep (world sizes 1 and 2, torchrun, gloo), its report, and the report
rebuilt from the run folders alone (what the SLURM sweep does at its end)."""

from __future__ import annotations

import argparse
import csv
import json
import struct
import sys
from pathlib import Path

import pytest

from conftest import results, run_cmd
from test_wandb import offline_runs, wandb_env

from ddp_mnist.config import ConfigError
from ddp_mnist.scale import make_plan

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def scale_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ddp_mnist", "scale", *args]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_strong_scaling_sweep_writes_csv_table_plot_and_wandb_group(tmp_path, data_dir):
    root = tmp_path / "sweep"
    env = wandb_env(tmp_path, data_dir)
    out = run_cmd(scale_cmd("--world-sizes", "1,2", "--mode", "strong", "--batch-size", "600", "--run-root", str(root),
                            "--wandb", "--", "--recipe", "tutorial", "--epochs", "1", "--device", "cpu"), env)
    rows = read_csv(root / "scaling.csv")
    assert [int(r["world_size"]) for r in rows] == [1, 2]

    # Every number comes from the run's own results.json and metrics.jsonl.
    for row in rows:
        res = results(root / f"ws{row['world_size']}")
        assert res["world_size"] == int(row["world_size"]) and res["batch_size"] == int(row["batch_size"]) == 600
        assert res["backend"] == row["backend"] == "gloo"
        assert float(row["steady_samples_per_second"]) == res["steady_samples_per_second"] > 0
        assert res["steady_steps"] == 100 - res["throughput_warmup_steps"]  # the first 20 steps are left out
        assert float(row["test_accuracy"]) == res["test_accuracy"]
        assert float(row["train_seconds"]) == res["train_seconds"]
        assert row["time_to_target_seconds"] == "" and res["time_to_target_seconds"] is None
        (epoch,) = [json.loads(line) for line in (root / f"ws{row['world_size']}" / "metrics.jsonl").open()]
        assert float(row["epoch_seconds"]) == epoch["epoch_seconds"]
    one, two = (results(root / f"ws{n}") for n in (1, 2))
    assert float(rows[0]["efficiency"]) == 1.0
    assert float(rows[1]["efficiency"]) == pytest.approx(two["steady_samples_per_second"]
                                                         / (2 * one["steady_samples_per_second"]))
    # Strong scaling: the same training at both world sizes (SGD: equal up to float rounding).
    assert one["test_accuracy"] == pytest.approx(two["test_accuracy"], abs=0.05)

    table = (root / "scaling.md").read_text()
    assert "strong scaling" in table and table in out.stdout
    assert f"| 2 | 600 | 300 | {two['steady_samples_per_second']:,.0f} |" in table
    width, height = png_size(root / "scaling.png")
    assert width >= 400 and height >= 200 and (root / "scaling.png").stat().st_size > 5000

    # W&B: both runs and a summary run (with the table and the plot) in one group.
    runs = offline_runs(tmp_path / "wandb")
    assert sorted(r.job_type for r in runs) == ["scaling-summary", "train", "train"]
    assert len({r.group for r in runs}) == 1 and runs[0].group == "sweep"
    (summary,) = [r for r in runs if r.job_type == "scaling-summary"]
    (logged,) = summary.history
    assert logged["scaling/table/_type"] == "table-file" and logged["scaling/table/nrows"] == 2
    assert logged["scaling/plot/_type"] == "image-file" and logged["scaling/plot/width"] == width
    assert summary.summary["efficiency/ws2"] == pytest.approx(float(rows[1]["efficiency"]))

    # The SLURM sweep's last step: the same report from the run folders alone. Finished runs are kept.
    again = run_cmd(scale_cmd("--from-runs", str(root), "--out", str(tmp_path / "report"), "--no-wandb"), env)
    assert read_csv(tmp_path / "report" / "scaling.csv") == rows
    assert (tmp_path / "report" / "scaling.md").read_text() == table and "Traceback" not in again.stderr
    assert png_size(tmp_path / "report" / "scaling.png") == (width, height)


def plan(*argv: str, train: tuple[str, ...] = ()):
    args = argparse.Namespace(world_sizes=[1, 2, 4], mode="strong", batch_size=None, run_root="r")
    for flag, value in zip(argv[::2], argv[1::2]):
        setattr(args, flag, value)
    return make_plan(args, list(train))


def test_plan_batches_and_errors():
    """Strong: one global batch (the recipe's by default). Weak: a fixed per-rank batch. Impossible
    sweeps fail before the first run, saying what to change."""
    strong = plan(train=("--recipe", "tutorial"))
    assert [strong.global_batch(n) for n in (1, 2, 4)] == [100, 100, 100]
    weak = plan("mode", "weak", "batch_size", 64)
    assert [weak.global_batch(n) for n in (1, 2, 4)] == [64, 128, 256]
    assert plan("mode", "weak").batch == 512  # the fast recipe's global batch, at the smallest world size
    with pytest.raises(ConfigError, match="divisible by world size 4"):
        plan("batch_size", 6)
    with pytest.raises(ConfigError, match="--batch-size: the harness sets"):
        plan(train=("--batch-size", "64"))

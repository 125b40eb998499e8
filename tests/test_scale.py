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
from conftest import base_env, ddp_mnist, free_port, results, run_cmd, train
from test_wandb import offline_runs, wandb_env

from ddp_mnist.commands.scale import train_config
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.errors import ConfigError
from ddp_mnist.scaling import analysis, sweep
from ddp_mnist.scaling.sweep import make_plan

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def scale(*args: str, env: dict[str, str]):
    """`ddp-mnist scale ARGS` in a process forked from the tests' server (it launches its runs with torchrun)."""
    return ddp_mnist(1, "scale", *args, env=env)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.process
def test_strong_scaling_sweep_writes_csv_table_plot_and_wandb_group(tmp_path, data_dir):
    root = tmp_path / "sweep"
    env = wandb_env(tmp_path, data_dir)
    out = scale(
        *(
            "--world-sizes",
            "1,2",
            "--mode",
            "strong",
            "--batch-size",
            "600",
            "--run-root",
            str(root),
            "--wandb",
            "--max-bytes",
            str(2**20),
            "--bench-steps",
            "5",
            "--",
            "--recipe",
            "tutorial",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--tensorboard",
        ),
        env=env,
    )
    rows = read_csv(root / "scaling.csv")
    assert [int(r["world_size"]) for r in rows] == [1, 2]

    # The runs wrote TensorBoard, so the report goes there too (tensorboard's own reader).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(root / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "scaling/scaling.png" in board.Tags()["images"] and "scaling/text_summary" in board.Tags()["tensors"]
    assert [e.step for e in board.Scalars("scaling/efficiency")] == [1, 2]
    assert (root / "ws2" / "tensorboard").is_dir()

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
    assert float(rows[1]["efficiency"]) == pytest.approx(
        two["steady_samples_per_second"] / (2 * one["steady_samples_per_second"])
    )
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
    assert logged["prediction/table/_type"] == "table-file" and logged["prediction/plot/_type"] == "image-file"
    assert summary.summary["prediction_error/ws2"] == pytest.approx(float(rows[1]["prediction_error"]))

    # Why: each world size's step decomposed, and the model's prediction of it from 1-rank timings.
    benches = {n: json.loads((root / f"ws{n}" / "comm_bench.json").read_text()) for n in (1, 2)}
    assert sorted(c["rank_batch"] for c in benches[1]["compute"]) == [
        75,
        300,
        600,
    ]  # every per-rank batch + a small one
    assert benches[1]["allreduce"] == [] and len(benches[2]["allreduce"]) >= 2
    for row in rows:
        step = float(row["step_seconds"])
        assert step == pytest.approx(600 / float(row["steady_samples_per_second"]))
        compute, comm = float(row["compute_seconds"]), float(row["comm_seconds"])
        overlap, other = float(row["overlap_seconds"]), float(row["other_seconds"])
        assert compute > 0 and 0 <= overlap <= min(compute, comm) and other >= 0
        assert float(row["straggler_seconds"]) >= 0
        assert compute + comm - overlap + other == pytest.approx(max(step, compute + comm - overlap))
        assert float(row["prediction_error"]) == pytest.approx(float(row["predicted_step_seconds"]) / step - 1)
        assert float(row["flops_per_sample"]) == res_flops(root, row)
    assert float(rows[0]["comm_seconds"]) == 0 and float(rows[1]["comm_seconds"]) > 0
    assert float(rows[1]["compute_seconds_1rank"]) == next(
        c["seconds"] for c in benches[1]["compute"] if c["rank_batch"] == 300
    )
    assert "| 2 | " in table and "predicted step (ms)" in table and "Model: compute(b) =" in table
    predictions = read_csv(root / "prediction.csv")
    weak = [int(p["world_size"]) for p in predictions if p["scaling"] == "weak"]
    strong = [p for p in predictions if p["scaling"] == "strong"]
    assert weak[-1] == 1024 and int(strong[-1]["world_size"]) == 600 and float(strong[-1]["rank_batch"]) == 1
    assert png_size(root / "prediction.png")[0] >= 400

    # The SLURM sweep's last step: the same report from the run folders alone. Finished runs are kept.
    again = scale("--from-runs", str(root), "--out", str(tmp_path / "report"), "--no-wandb", env=env)
    assert read_csv(tmp_path / "report" / "scaling.csv") == rows
    assert (tmp_path / "report" / "scaling.md").read_text() == table and "Traceback" not in again.stderr
    assert png_size(tmp_path / "report" / "scaling.png") == (width, height)
    assert read_csv(tmp_path / "report" / "prediction.csv") == predictions


def res_flops(root: Path, row: dict[str, str]) -> float:
    return results(root / f"ws{row['world_size']}")["flops_per_sample"]


@pytest.mark.process
def test_all_reduce_sweep_under_torchrun_reports_every_size(tmp_path, data_dir):
    """comm_bench at 2 ranks: one row per message size (and the gradient's), nccl-tests' bandwidths, and
    both ranks' compute timings."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    TrainConfig(recipe="tutorial", device="cpu").save(run_dir / "config.json")
    run_cmd(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            "-m",
            "ddp_mnist.scaling.comm_bench",
            "--run-dir",
            str(run_dir),
            "--min-bytes",
            "4096",
            "--max-bytes",
            "65536",
            "--steps",
            "3",
            "--rank-batches",
            "50",
        ],
        base_env(data_dir),
    )
    bench = json.loads((run_dir / "comm_bench.json").read_text())
    gradient = 523_326 * 4
    assert bench["world_size"] == 2 and bench["gradient_bytes"] == gradient and bench["bucket_cap_mb"] == 25
    assert [a["bytes"] for a in bench["allreduce"]] == [8, 4096, 8192, 16384, 32768, 65536, gradient]
    # CPU: a stop check every 21 steps (the MLP at batch 100: about 0.1 s of steps), a loss check every 50
    assert bench["control_allreduces_per_step"] == pytest.approx(1 / 21 + 2 / 50)
    for a in bench["allreduce"]:
        assert a["seconds"] > 0 and a["algbw_GBps"] == pytest.approx(a["bytes"] / a["seconds"] / 1e9)
        assert a["busbw_GBps"] == pytest.approx(a["algbw_GBps"])  # 2(N-1)/N = 1 at N = 2
    (compute,) = bench["compute"]
    assert compute["rank_batch"] == 50 and compute["steps"] == 3 and len(compute["seconds_by_rank"]) == 2
    assert compute["seconds"] == max(compute["seconds_by_rank"]) > 0
    # Each step's slowest rank, averaged: never below a rank's own mean (up to reading the clock).
    assert compute["seconds_slowest_each_step"] >= 0.99 * compute["seconds"]


@pytest.mark.process
def test_profile_writes_a_trace_and_a_summary(tmp_path, data_dir):
    """--profile 3: rank 0's trace of 3 steps as Chrome/Perfetto JSON, and the split
    between all-reduce and compute in results.json."""
    run_dir = tmp_path / "run"
    train(2, run_dir, data_dir, "--recipe", "tutorial", "--max-steps", "6", "--profile", "3", "--device", "cpu")
    trace = json.loads((run_dir / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert sum(n.startswith("ProfilerStep#") for n in names) == 3
    assert "gloo:all_reduce" in names and "aten::addmm" in names
    profile = results(run_dir)["profile"]
    assert profile["steps"] == 3 and profile["trace"] == "trace.json"
    assert profile["step_seconds"] > 0 and profile["all_reduce_seconds"] > 0 and profile["compute_seconds"] > 0
    assert 0 < profile["compute_fraction"] <= 1
    assert results(run_dir)["flops_per_sample"] == 6 * (784 * 500 + 500 * 256 + 256 * 10) - 2 * 784 * 500


def test_more_ranks_than_cores_warns(monkeypatch, caplog):
    monkeypatch.setattr(sweep, "usable_cores", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with caplog.at_level("WARNING", logger="ddp_mnist"):
        sweep.warn_shared_cores([1, 2, 3, 4])
    (warning,) = caplog.messages
    assert "world size(s) 3, 4" in warning and "2 cores" in warning
    caplog.clear()
    sweep.warn_shared_cores([1, 2])
    assert caplog.messages == []


def test_target_link_needs_both_flags():
    args = argparse.Namespace(link_gbps=400.0, latency_us=10.0)
    assert analysis.target_link(args).bandwidth_Bps == pytest.approx(50e9)
    assert analysis.target_link(argparse.Namespace(link_gbps=None, latency_us=None)) is None
    with pytest.raises(ConfigError, match="together"):
        analysis.target_link(argparse.Namespace(link_gbps=400.0, latency_us=None))


def plan(*argv: str, train: tuple[str, ...] = ()):
    args = argparse.Namespace(world_sizes=[1, 2, 4], mode="strong", batch_size=None, run_root="r")
    for flag, value in zip(argv[::2], argv[1::2]):
        setattr(args, flag, value)
    return make_plan(args, list(train), train_config, Path(args.run_root))


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
    with pytest.raises(ConfigError, match="--min-bytes <= --max-bytes"):
        plan("bench", True, "min_bytes", 4096, "max_bytes", 1024, "bench_steps", 5)


@pytest.mark.process
def test_variants_run_into_their_folders_and_are_compared(tmp_path, data_dir):
    """--variant FLAGS: one experiment per variant under RUN_ROOT/<name>/, each with its report, and a
    comparison (every row with its variant) in RUN_ROOT; --from-runs RUN_ROOT rebuilds the same."""
    root, env = tmp_path / "knobs", base_env(data_dir)
    scale(
        *(
            "--world-sizes",
            "1",
            "--batch-size",
            "100",
            "--run-root",
            str(root),
            "--no-bench",
            "--variant",
            "--lr 0.02",
            "--variant",
            "--lr=0.05 --momentum 0.5",
            "--",
            "--recipe",
            "tutorial",
            "--max-steps",
            "3",
            "--device",
            "cpu",
        ),
        env=env,
    )
    names = ["lr-0.02", "lr-0.05_momentum-0.5"]
    for name, lr in zip(names, (0.02, 0.05)):
        assert json.loads((root / name / "ws1" / "config.json").read_text())["lr"] == lr
        assert (root / name / "scaling.md").exists() and not (root / name / "prediction.csv").exists()  # no bench
    rows = read_csv(root / "scaling.csv")
    assert [r["variant"] for r in rows] == names and {r["run_dir"] for r in rows} == {
        str(root / n / "ws1") for n in names
    }
    assert "| lr-0.05_momentum-0.5 | 1 |" in (root / "scaling.md").read_text()
    scale("--from-runs", str(root), "--out", str(tmp_path / "again"), "--no-wandb", env=env)
    assert read_csv(tmp_path / "again" / "scaling.csv") == rows
    assert (tmp_path / "again" / "lr-0.02" / "scaling.csv").exists()


def test_variant_names():
    assert sweep.variant_name(["--strategy", "zero1", "--comm-hook", "bf16"]) == "strategy-zero1_comm-hook-bf16"
    assert sweep.variant_name(["--comm-hook=powersgd"]) == "comm-hook-powersgd"
    assert sweep.variant_name(["--no-compile"]) == "no-compile"


def test_a_sweep_root_with_array_plans_and_logs_beside_its_variants_is_one_experiment_per_variant(tmp_path):
    """slurm/sweep.sh ARRAY=1 leaves RUN_ROOT/ws<N>.array and RUN_ROOT/ws<N>-<i>.log beside the variant folders:
    files named ws*, which must not make RUN_ROOT look like one run folder of world sizes."""
    for variant in ("a", "b"):
        (tmp_path / variant / "ws1").mkdir(parents=True)
        (tmp_path / variant / "ws1" / "results.json").write_text("{}")
    (tmp_path / "ws1.array").write_text("a/ws1\t\nb/ws1\t--lr 0.02\n")
    (tmp_path / "ws1-0.log").write_text("")
    found = sweep.found_experiments(argparse.Namespace(from_runs=[str(tmp_path)], out=None))
    assert [(e.name, e.out) for e in found] == [("a", tmp_path / "a"), ("b", tmp_path / "b")]

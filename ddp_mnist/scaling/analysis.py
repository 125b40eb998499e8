"""The sweep's rows and their explanation: what each run measured, and its step taken apart into
compute, communication and the loop's own cost with the performance model (perf_model.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from ddp_mnist.artifacts.run_dir import read_metrics, read_results
from ddp_mnist.errors import ConfigError
from ddp_mnist.scaling import perf_model as pm
from ddp_mnist.scaling.comm_bench import BENCH_FILE
from ddp_mnist.scaling.sweep import KNOBS, ONE_RANK_BENCH

log = logging.getLogger("ddp_mnist")


# The measured step's parts and the model's prediction of it: filled in by `decompose` (perf_model.py).
EXPLAINED = (
    "compute_seconds",
    "compute_seconds_1rank",
    "compute_slowdown",
    "sharing_rule",
    "comm_seconds",
    "overlap_seconds",
    "other_seconds",
    "straggler_seconds",
    "predicted_step_seconds",
    "predicted_samples_per_second",
    "predicted_efficiency",
    "prediction_error",
)


COLUMNS = (
    "world_size",
    "nodes",
    "batch_size",
    "batch_per_rank",
    "steps",
    "steady_samples_per_second",
    "steady_samples_per_second_per_rank",
    "speedup",
    "efficiency",
    "epoch_seconds",
    "train_seconds",
    "time_to_target_seconds",
    "target_accuracy",
    "test_accuracy",
    "device",
    "backend",
    "run_dir",
    *KNOBS,
    # Why (perf_model.py): the measured step, its parts, and the model's prediction of it.
    "step_seconds",
    *EXPLAINED,
    "flops_per_sample",
    "achieved_tflops",
    "mfu",
)


PREDICTION_COLUMNS = (
    "scaling",
    "world_size",
    "global_batch",
    "rank_batch",
    "compute_seconds",
    "comm_seconds",
    "step_seconds",
    "samples_per_second",
    "efficiency",
)


WEAK_UP_TO = 1024


def scaling_rows(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """One row per run, sorted by world size, with speedup and efficiency against the smallest."""
    if not run_dirs:
        raise ConfigError("no finished runs to report on")
    rows = sorted((run_row(d) for d in run_dirs), key=lambda r: r["world_size"])
    sizes = [r["world_size"] for r in rows]
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"two runs share a world size ({sizes}); give one sweep's runs")
    base = rows[0]
    for row in rows:
        tput, base_tput = row["steady_samples_per_second"], base["steady_samples_per_second"]
        row["steady_samples_per_second_per_rank"] = tput / row["world_size"] if tput else None
        row["speedup"] = tput / base_tput if tput and base_tput else None
        row["efficiency"] = pm.parallel_efficiency(tput, base_tput, row["world_size"], base["world_size"])
    return rows


def run_row(run_dir: Path) -> dict[str, Any]:
    r = read_results(run_dir)
    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    epoch_times = [m["epoch_seconds"] for m in metrics if "epoch_seconds" in m]
    return {
        "world_size": r["world_size"],
        "nodes": r.get("nodes", 1),
        "batch_size": r["batch_size"],
        "batch_per_rank": r["batch_size"] // r["world_size"],
        "steps": r["steps"],
        "steady_samples_per_second": r.get("steady_samples_per_second"),
        # The median: the first epoch also holds the start-up steps.
        "epoch_seconds": statistics.median(epoch_times) if epoch_times else None,
        "train_seconds": r["train_seconds"],
        "time_to_target_seconds": r.get("time_to_target_seconds"),
        "target_accuracy": r.get("target_accuracy"),
        "test_accuracy": r.get("test_accuracy"),
        "device": r.get("device"),
        "backend": r.get("backend"),
        "run_dir": str(run_dir),
        **{k: r.get(k) for k in (*KNOBS, "flops_per_sample", "achieved_tflops", "mfu")},
        # The measured step: the global batch over the steady throughput.
        "step_seconds": r["batch_size"] / r["steady_samples_per_second"]
        if r.get("steady_samples_per_second")
        else None,
        **dict.fromkeys(EXPLAINED),
    }


# ---------------------------------------------------------------------- why it scales (perf_model.py)
@dataclasses.dataclass
class Explanation:
    """The fitted model, and its predictions beyond this machine (weak to 1024 ranks, strong to the
    global batch), one rank per device, over the measured or the named link."""

    machine: pm.Machine  # this machine: 1-rank compute, measured link, cores shared
    target: pm.Machine  # beyond it: one rank per device, measured or named link
    link_source: str
    predictions: list[dict[str, Any]]


def target_link(args: argparse.Namespace) -> pm.Link | None:
    gbps, latency = getattr(args, "link_gbps", None), getattr(args, "latency_us", None)
    if gbps is None and latency is None:
        return None
    if gbps is None or latency is None:
        raise ConfigError(
            "--link-gbps and --latency-us name a target link together, e.g. --link-gbps 400 "
            "--latency-us 10; give both, or neither for the measured link"
        )
    try:
        return pm.Link.named(gbps, latency)
    except ValueError as e:
        raise ConfigError(f"--link-gbps/--latency-us: {e}") from None


def read_benches(run_dirs: list[Path], bench_root: Path) -> tuple[dict[int, dict], dict | None]:
    """Each world size's comm_bench.json, and the 1-rank one (ws1's, or the sweep's bench-1rank.json)."""
    benches = {}
    for d in run_dirs:
        bench = _read_json(d / BENCH_FILE)
        if bench:
            benches[bench["world_size"]] = bench
    return benches, benches.get(1) or _read_json(bench_root / ONE_RANK_BENCH) or None


def explain(
    rows: list[dict[str, Any]], run_dirs: list[Path], bench_root: Path, link: pm.Link | None
) -> Explanation | None:
    """Decompose each measured step (compute, all-reduce, overlap), fit the model from the 1-rank compute
    and the all-reduce sweeps, and state its error at each world size measured here. None without benches."""
    benches, one = read_benches(run_dirs, bench_root)
    sweeps = [(a["bytes"], b["world_size"], a["seconds"]) for b in benches.values() for a in b["allreduce"]]
    if one is None or not one.get("compute"):
        if rows and any(r["world_size"] > 1 for r in rows):
            log.warning("no 1-rank compute timings (comm_bench): the report has no decomposition or model")
        return None
    compute = pm.fit_compute([(c["rank_batch"], c["seconds"]) for c in one["compute"]])
    try:
        measured_link = pm.fit_link(sweeps)
    except ValueError as e:
        if link is None:
            log.warning("no link to model (%s): the report has no prediction", e)
            return None
        measured_link = link
    machine = pm.Machine(
        compute,
        measured_link,
        one["gradient_bytes"],
        one["bucket_cap_mb"],
        one["threads_per_rank"],
        one["cores"],
        one.get("control_allreduces_per_step", 0.0),
        tuple(bench_messages(one)),
    )
    one_rank = {c["rank_batch"]: c["seconds"] for c in one["compute"]}
    alone = next((r for r in rows if r["world_size"] == 1 and r["step_seconds"]), None)
    if alone and one_rank.get(alone["batch_per_rank"]):  # the 1-rank step beyond its compute: the loop's own cost
        machine = dataclasses.replace(
            machine, overhead_s=max(alone["step_seconds"] - one_rank[alone["batch_per_rank"]], 0.0)
        )
    for row in rows:
        decompose(row, benches.get(row["world_size"]), one_rank, machine)
    base = rows[0]
    for row in rows:  # predicted efficiency, the same formula as the measured one
        row["predicted_efficiency"] = pm.parallel_efficiency(
            row["predicted_samples_per_second"],
            base["predicted_samples_per_second"],
            row["world_size"],
            base["world_size"],
        )
    target = dataclasses.replace(machine, link=link or measured_link, cores=None)
    global_batch, rank_batch = base["batch_size"], base["batch_per_rank"]
    predictions = [
        {"scaling": "weak", **dataclasses.asdict(p)}
        for p in pm.weak_scaling(target, rank_batch, pm.powers_of_two(WEAK_UP_TO))
    ] + [
        {"scaling": "strong", **dataclasses.asdict(p)}
        for p in pm.strong_scaling(target, global_batch, pm.powers_of_two(global_batch))
    ]
    for p in predictions:  # the report's names
        p.update(compute_seconds=p.pop("compute_s"), comm_seconds=p.pop("comm_s"), step_seconds=p.pop("step_s"))
    return Explanation(machine, target, "named" if link else "measured", predictions)


def bench_messages(bench: dict) -> list[tuple[float, float]]:
    """The step's messages as comm_bench recorded them (bytes, count); from a bench without them, the
    gradient's buckets and the loop's control all-reduces."""
    if bench.get("messages"):
        return [tuple(m) for m in bench["messages"]]
    return pm.step_messages(
        bench["gradient_bytes"], bench["bucket_cap_mb"], control=bench.get("control_allreduces_per_step", 0.0)
    )


def decompose(row: dict[str, Any], bench: dict | None, one_rank: dict[int, float], machine: pm.Machine) -> None:
    """The measured step's parts at this world size, and the model's prediction of it (from the 1-rank
    compute, the core-sharing rule and the fitted link)."""
    n, b = row["world_size"], row["batch_per_rank"]
    row["sharing_rule"] = pm.sharing(n, machine.threads_per_rank, machine.cores)
    row["compute_seconds_1rank"] = one_rank.get(b)
    # The 1-rank compute measured at this very batch, when there is one, is better than the fit.
    compute, comm = pm.predict_step(machine, n, b, alone_s=row["compute_seconds_1rank"] or None)
    row["predicted_step_seconds"] = compute + comm
    row["predicted_samples_per_second"] = row["batch_size"] / row["predicted_step_seconds"]
    if row["step_seconds"]:
        row["prediction_error"] = pm.relative_error(row["predicted_step_seconds"], row["step_seconds"])
    if bench is None:
        return
    timing: dict[str, Any] = next((c for c in bench["compute"] if c["rank_batch"] == b), {})
    measured, slowest = timing.get("seconds"), timing.get("seconds_slowest_each_step")
    sweep = [(a["bytes"], a["seconds"]) for a in bench["allreduce"]]
    row["compute_seconds"] = measured
    if slowest is not None and measured is not None:  # what waiting for the slowest rank each step adds
        row["straggler_seconds"] = max(slowest - measured, 0.0)
    row["comm_seconds"] = (
        sum(k * pm.interpolate_seconds(sweep, x) for x, k in bench_messages(bench)) if sweep and n > 1 else 0.0
    )
    if measured and row["compute_seconds_1rank"]:
        row["compute_slowdown"] = measured / row["compute_seconds_1rank"]
    if measured is not None and row["step_seconds"]:
        row["overlap_seconds"], row["other_seconds"] = pm.overlap(measured, row["comm_seconds"], row["step_seconds"])


def scaling_mode(rows: list[dict[str, Any]]) -> str:
    if len({r["batch_size"] for r in rows}) == 1:
        return "strong"
    return "weak" if len({r["batch_per_rank"] for r in rows}) == 1 else "mixed-batch"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # inf: no bandwidth limit seen (perf_model.fit_link)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

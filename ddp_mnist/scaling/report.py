"""The sweep's report: scaling.csv/.md, the explanation and prediction tables, the comparison of variants,
and the summary W&B run."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from ddp_mnist.scaling import perf_model as pm
from ddp_mnist.scaling.analysis import (
    COLUMNS,
    PREDICTION_COLUMNS,
    Explanation,
    _finite,
    _read_json,
    explain,
    scaling_mode,
    scaling_rows,
)
from ddp_mnist.scaling.plots import _points, _two_panels, plot, plot_prediction
from ddp_mnist.scaling.sweep import KNOBS, Experiment

log = logging.getLogger("ddp_mnist")


REPORT_CSV, REPORT_MD, REPORT_PNG = "scaling.csv", "scaling.md", "scaling.png"


PREDICTION_CSV, PREDICTION_PNG = "prediction.csv", "prediction.png"


def report_experiment(experiment: Experiment, link: pm.Link | None):
    rows = scaling_rows(experiment.run_dirs)
    model = explain(rows, experiment.run_dirs, experiment.bench_root, link)
    return rows, write_report(rows, experiment.out, model), model


def write_report(rows: list[dict[str, Any]], out: Path, model: Explanation | None = None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in (REPORT_CSV, REPORT_MD, REPORT_PNG)}
    write_csv(files[REPORT_CSV], COLUMNS, rows)
    files[REPORT_MD].write_text(markdown_table(rows) + (explanation_markdown(rows, model) if model else ""))
    plot(rows, files[REPORT_PNG])
    if model is not None:
        files[PREDICTION_CSV], files[PREDICTION_PNG] = out / PREDICTION_CSV, out / PREDICTION_PNG
        write_csv(files[PREDICTION_CSV], PREDICTION_COLUMNS, model.predictions)
        plot_prediction(rows, model, files[PREDICTION_PNG])
    return files


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in columns} for row in rows)


def explanation_markdown(rows: list[dict[str, Any]], model: Explanation) -> str:
    """Why: each step's parts, the model and its error here, and its predictions beyond this machine."""
    m, t = model.machine, model.target
    knobs = [k for k in KNOBS if any(r.get(k) is not None for r in rows)]
    lines = [
        "",
        "Why: the measured step (global batch / steady samples/s) and its parts. Compute: forward, backward, "
        "optimizer and data on each rank with no all-reduce, timed in all ranks at once (comm_bench.py); "
        "all-reduce: the process group's own, at the gradient's size, per DDP bucket, plus the loop's tiny "
        "control all-reduces (stop-signal and loss checks); overlap = compute + "
        "all-reduce - step, clamped to [0, min(compute, all-reduce)]; other = what neither explains (data "
        "waits, Python, waiting for the slowest rank); slowest rank: how much longer than compute "
        "(the slowest rank's mean) the steps take when each waits for its slowest rank (part of other). "
        "Predicted: 1-rank compute x the core-sharing rule "
        "max(1, ranks x threads / cores) + the loop's overhead (the 1-rank step minus its compute) + the fitted "
        "ring all-reduce; error = predicted / measured - 1.",
        "",
        "| world size | " + "".join(f"{k} | " for k in knobs) + "step (ms) | compute (ms) | 1 rank alone (ms) "
        "| slowdown measured / rule | all-reduce (ms) | overlap (ms) | other (ms) | slowest rank (ms) "
        "| predicted step (ms) | error "
        "| GFLOP/sample | achieved TFLOP/s | MFU |",
        "|---:|" + "---|" * len(knobs) + "---:|" * 13,
    ]
    for r in rows:
        slowdown = f"{_num(r['compute_slowdown'], 2)} / {_num(r['sharing_rule'], 2)}"
        error = _percent_error(r["prediction_error"])
        lines.append(
            f"| {r['world_size']} | "
            + "".join(f"{_num_or(r.get(k))} | " for k in knobs)
            + f"{_ms(r['step_seconds'])} | {_ms(r['compute_seconds'])} | {_ms(r['compute_seconds_1rank'])} "
            f"| {slowdown} | {_ms(r['comm_seconds'])} | {_ms(r['overlap_seconds'])} | {_ms(r['other_seconds'])} "
            f"| {_ms(r['straggler_seconds'])} | {_ms(r['predicted_step_seconds'])} | {error} "
            f"| {_num(None if r['flops_per_sample'] is None else r['flops_per_sample'] / 1e9, 4)} "
            f"| {_num(r['achieved_tflops'], 4)} | {_num(None if r['mfu'] is None else 100 * r['mfu'], 1)}"
            f"{'%' if r['mfu'] is not None else ''} |"
        )
    buckets = pm.buckets(m.gradient_bytes, m.bucket_cap_mb)
    lines += [
        "",
        f"Model: compute(b) = {1e3 * m.compute.fixed_s:.3f} ms + {1e6 * m.compute.per_sample_s:.2f} us x b "
        f"(1 rank alone), plus the loop's overhead of {1e3 * m.overhead_s:.2f} ms per step; "
        f"ring all-reduce t = 2(N-1) x {1e6 * m.link.latency_s:.1f} us + 2(N-1)/N x bytes / "
        f"{m.link.bandwidth_Bps / 1e9:.3f} GB/s (fitted to the all-reduce sweeps); gradient "
        f"{m.gradient_bytes / pm.MB:.2f} MiB in {len(buckets)} bucket(s) of {m.bucket_cap_mb:g} MiB (one bucket: "
        f"its all-reduce starts after backward, nothing overlaps); {m.threads_per_rank} thread(s) per rank on "
        f"{m.cores} core(s); per step, as all-reduce equivalents (bytes x count; the strategy, the hook's "
        f"compression, and {m.control:.2f} control all-reduce(s)): "
        + ", ".join(f"{nbytes:,.0f} x {count:.2f}" for nbytes, count in m.step_messages())
        + ".",
        "",
        f"Predicted beyond this machine (prediction.csv, prediction.png): one rank per device, {model.link_source} "
        f"link ({1e6 * t.link.latency_s:.1f} us, {t.link.bandwidth_Bps / 1e9:.2f} GB/s).",
        "",
        "| scaling | world size | global batch | per-rank batch | step (ms) | compute (ms) | all-reduce (ms) "
        "| samples/s | efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in model.predictions:
        if p["world_size"] in (1, 2, 8, 64, 1024) or p["world_size"] == p["global_batch"]:
            lines.append(
                f"| {p['scaling']} | {p['world_size']} | {p['global_batch']} | {p['rank_batch']:g} "
                f"| {_ms(p['step_seconds'])} | {_ms(p['compute_seconds'])} | {_ms(p['comm_seconds'])} "
                f"| {_num(p['samples_per_second'], 0)} | {100 * p['efficiency']:.0f}% |"
            )
    return "\n".join(lines) + "\n"


def _num_or(value: Any) -> str:
    return "default" if value is None else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    base, target = rows[0], rows[0]["target_accuracy"]
    lines = [
        f"Scaling: {scaling_mode(rows)} scaling, {base['device']}, backend {base['backend']}; efficiency against "
        f"world size {base['world_size']}.",
        "",
        f"| world size | global batch | per-rank batch | samples/s (steady) | per rank | speedup | efficiency "
        f"| epoch (s, median) | time to {_num(target, 1)}% (s) | test accuracy (%) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world_size']} | {r['batch_size']} | {r['batch_per_rank']} "
            f"| {_num(r['steady_samples_per_second'], 0)} "
            f"| {_num(r['steady_samples_per_second_per_rank'], 0)} | {_num(r['speedup'], 2)} "
            f"| {_num(None if r['efficiency'] is None else 100 * r['efficiency'], 0)}% | {_num(r['epoch_seconds'], 2)} "
            f"| {_num(r['time_to_target_seconds'], 1, 'not reached')} | {_num(r['test_accuracy'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:,.{digits}f}"


def _ms(seconds: float | None) -> str:
    return _num(None if seconds is None else 1e3 * seconds, 2)


def _percent_error(error: float | None) -> str:
    return "n/a" if error is None else f"{100 * error:+.0f}%"


def write_comparison(reports: list, out: Path) -> dict[str, Path]:
    """The variants side by side in `out`: scaling.csv (every row, with its variant), scaling.md (a
    comparison table) and scaling.png (throughput and efficiency, one line per variant)."""
    variants = [(Path(files[REPORT_CSV]).parent.name, row_list) for row_list, files, _ in reports]  # folder = name
    rows = [{"variant": name, **row} for name, row_list in variants for row in row_list]
    files = {name: out / name for name in (REPORT_CSV, REPORT_MD, REPORT_PNG)}
    write_csv(files[REPORT_CSV], ("variant", *COLUMNS), rows)
    lines = [
        "Variants compared (each variant's folder has its full report).",
        "",
        "| variant | world size | samples/s | efficiency | step (ms) | compute (ms) | all-reduce (ms) "
        "| overlap (ms) | other (ms) | predicted (ms) | error | test accuracy (%) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        error = _percent_error(r["prediction_error"])
        lines.append(
            f"| {r['variant']} | {r['world_size']} | {_num(r['steady_samples_per_second'], 0)} "
            f"| {_num(None if r['efficiency'] is None else 100 * r['efficiency'], 0)}% "
            f"| {_ms(r['step_seconds'])} | {_ms(r['compute_seconds'])} | {_ms(r['comm_seconds'])} "
            f"| {_ms(r['overlap_seconds'])} | {_ms(r['other_seconds'])} | {_ms(r['predicted_step_seconds'])} "
            f"| {error} | {_num(r['test_accuracy'], 2)} |"
        )
    files[REPORT_MD].write_text("\n".join(lines) + "\n")
    fig, left, right = _two_panels(9, 3.4)
    for name, row_list in variants:
        left.plot(*_points(row_list, "steady_samples_per_second"), "o-", label=name)
        right.plot(*_points(row_list, "efficiency", 100), "o-", label=name)
    left.set(xlabel="world size (ranks)", ylabel="samples/s (steady state)", title="Throughput", ylim=(0, None))
    right.set(xlabel="world size (ranks)", ylabel="% of linear", title="Parallel efficiency", ylim=(0, 110))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(files[REPORT_PNG])
    return files


# ---------------------------------------------------------------------- W&B
def log_summary_run(
    rows: list[dict[str, Any]],
    files: dict[str, Path],
    run_dirs: list[Path],
    wanted: bool | None,
    model: Explanation | None = None,
    variant: str | None = None,
) -> None:
    """A summary run in the runs' W&B group, with the table and the plot. Never fails the report."""
    configs = [_wandb_settings(d) for d in run_dirs]
    tracked = [c for c in configs if c.get("wandb")]
    if not (wanted if wanted is not None else tracked):
        return
    cfg = (tracked or configs or [{}])[0]
    groups = {c.get("wandb_group") for c in tracked}
    if len(groups) > 1:
        log.warning(
            "W&B: the runs are in several groups %s; the summary run goes to %s",
            sorted(map(str, groups)),
            cfg.get("wandb_group"),
        )
    from ddp_mnist.artifacts.tracking import import_wandb, init_run

    try:
        wandb = import_wandb()
        run = init_run(
            mode=cfg.get("wandb_mode"),
            job_type="scaling-summary",
            name=f"scaling-summary-{variant}" if variant else "scaling-summary",
            project=cfg.get("wandb_project") or os.environ.get("WANDB_PROJECT") or "ddp-mnist",
            entity=cfg.get("wandb_entity"),
            group=cfg.get("wandb_group"),
            tags=cfg.get("wandb_tags") or None,
            dir=None if os.environ.get("WANDB_DIR") else str(files[REPORT_CSV].parent),
            config={
                "mode": scaling_mode(rows),
                "world_sizes": [r["world_size"] for r in rows],
                "runs": [str(d) for d in run_dirs],
            },
        )
        table = wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows])
        logged = {
            "scaling/table": table,
            "scaling/plot": wandb.Image(str(files[REPORT_PNG])),
            "scaling/throughput": wandb.plot.line(
                table, "world_size", "steady_samples_per_second", title="steady samples/s against world size"
            ),
            "scaling/efficiency": wandb.plot.line(
                table, "world_size", "efficiency", title="parallel efficiency against world size"
            ),
        }
        if model is not None:  # the model: its predictions (table, plot) and its error at each measured size
            logged["prediction/table"] = wandb.Table(
                columns=list(PREDICTION_COLUMNS), data=[[p[c] for c in PREDICTION_COLUMNS] for p in model.predictions]
            )
            logged["prediction/plot"] = wandb.Image(str(files[PREDICTION_PNG]))
        run.log(logged)
        run.summary.update({f"efficiency/ws{r['world_size']}": r["efficiency"] for r in rows})
        if model is not None:
            run.summary.update({f"prediction_error/ws{r['world_size']}": r["prediction_error"] for r in rows})
            run.summary.update(
                {
                    "model/latency_us": 1e6 * model.machine.link.latency_s,
                    "model/bandwidth_GBps": _finite(model.machine.link.bandwidth_Bps / 1e9),
                }
            )
        run.finish()
        log.info("W&B summary run %s in group %s", run.id, cfg.get("wandb_group"))
    except Exception as e:  # noqa: BLE001 - the report files are written already
        log.warning("W&B summary run failed (%s: %s); the report files are unaffected", type(e).__name__, e)


def log_tensorboard(
    rows: list[dict[str, Any]], files: dict[str, Path], run_dirs: list[Path], wanted: bool | None, out: Path
) -> Path | None:
    """`scale --tensorboard` (by default when the runs wrote TensorBoard): OUT/tensorboard/ gets the table as
    text, the plots as images and each world size's throughput and efficiency as scalars (their step: the world
    size). Returns the folder, or None when not asked. Never fails the report."""
    tracked = any(_read_json(d / "config.json").get("tensorboard") for d in run_dirs)
    if not (wanted if wanted is not None else tracked):
        return None
    try:
        import numpy as np
        from PIL import Image
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(out / "tensorboard")) as writer:
            writer.add_text("scaling", files[REPORT_MD].read_text())
            for name, path in files.items():
                if path.suffix == ".png":
                    writer.add_image(f"scaling/{name}", np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")
            for row in rows:
                for key in ("steady_samples_per_second", "efficiency"):
                    if isinstance(row.get(key), (int, float)):
                        writer.add_scalar(f"scaling/{key}", row[key], int(row["world_size"]))
    except Exception as e:  # noqa: BLE001 - the report is written already: TensorBoard is an extra view of it
        log.warning("TensorBoard: the scaling report was not written there (%s: %s)", type(e).__name__, e)
        return None
    return out / "tensorboard"


def _wandb_settings(run_dir: Path) -> dict[str, Any]:
    """The run's W&B flags (config.json), with where its run really went (tracker.json): a group or
    project given through WANDB_* variables, as in the SLURM sweep, is only known there."""
    cfg, where = _read_json(run_dir / "config.json"), _read_json(run_dir / "tracker.json")
    if where.get("run_id"):
        cfg.update(wandb=True, **{f"wandb_{k}": where[k] for k in ("project", "entity", "group") if where.get(k)})
    return cfg

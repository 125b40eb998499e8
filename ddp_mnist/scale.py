"""`ddp-mnist scale`: the same training at several world sizes, and a report of how it scales.

Folder layout, shared with the SLURM sweep (slurm/): RUN_ROOT/ws<N>/ is an ordinary run folder
(`ddp-mnist train --run-dir RUN_ROOT/ws<N>`) of the run at world size N. The report goes into RUN_ROOT
(or --out): scaling.csv (every number), scaling.md (a table), scaling.png (throughput and efficiency).

The runs come from one of two places:
- this node: one torchrun per world size, one after another (`ddp-mnist scale --world-sizes 1,2,4`);
  re-running the same command keeps finished runs and resumes an interrupted one;
- anywhere else, e.g. a SLURM sweep: `ddp-mnist scale --from-runs RUN_ROOT` only builds the report.

Strong scaling keeps the global batch B fixed (each of N ranks takes B/N: the same training, less work
per rank). Weak scaling keeps the per-rank batch b fixed (global batch b*N: more samples per step, fewer
steps per epoch, so the training itself changes with N).

Throughput is results.json's `steady_samples_per_second`: training time only (no evaluation or
checkpoints), after each process's first --throughput-warmup-steps steps, the clock read after a device
sync. Parallel efficiency at N: throughput(N) / (throughput(N0) * N / N0), N0 the smallest world size;
1.0 is linear scaling. The same formula serves both modes (weak: per-rank work is fixed, so it equals
N0-step time / N-step time).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .arguments import HelpFormatter, add_train_arguments, config_from_args, examples
from .config import ConfigError, TrainConfig
from .run_dir import read_metrics, read_results

log = logging.getLogger("ddp_mnist")

REPORT_CSV, REPORT_MD, REPORT_PNG = "scaling.csv", "scaling.md", "scaling.png"
COLUMNS = ("world_size", "nodes", "batch_size", "batch_per_rank", "steps", "steady_samples_per_second",
           "steady_samples_per_second_per_rank", "speedup", "efficiency", "epoch_seconds", "train_seconds",
           "time_to_target_seconds", "target_accuracy", "test_accuracy", "device", "backend", "run_dir")
# Flags the harness sets for every run; in the train flags they would contradict the sweep.
OWN_FLAGS = ("--run-dir", "--batch-size", "--resume", "--expected-world-size")


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Run `ddp-mnist train` at several world sizes on this node (torchrun), or read finished "
                     "runs (--from-runs), and write scaling.csv, scaling.md and scaling.png.")
    p.epilog = examples("ddp-mnist scale --world-sizes 1,2,4 -- --model cnn --epochs 1",
                        "ddp-mnist scale --mode weak --batch-size 128 --world-sizes 1,2 -- --max-steps 200",
                        "ddp-mnist scale --from-runs runs/sweep-cnn        # the report of a SLURM sweep")
    p.add_argument("--world-sizes", type=parse_world_sizes, default=[1, 2], metavar="N,N,...",
                   help="world sizes to run, e.g. 1,2,4")
    p.add_argument("--mode", choices=("strong", "weak"), default="strong",
                   help="strong: fixed global batch; weak: fixed per-rank batch")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="strong: the global batch of every run; weak: the per-rank batch (default: recipe; for "
                        "weak, the recipe's batch split over the smallest world size)")
    p.add_argument("--run-root", default=None, metavar="DIR",
                   help="folder holding the runs as DIR/ws<N>/ (default: runs/scale-<mode>-<time>)")
    p.add_argument("--from-runs", nargs="+", default=None, metavar="DIR",
                   help="only build the report, from sweep folders (DIR/ws*/) or run folders (DIR/results.json)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="report folder (default: the run root, or the first --from-runs DIR)")
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                   help="log every run and a summary run (the table and the plot) to W&B, in one group "
                        "(default: when the runs log to W&B, i.e. --wandb among the train flags)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN FLAGS",
                   help="flags for every `ddp-mnist train` run, e.g. -- --model cnn --epochs 1 --wandb "
                        "(see ddp-mnist train --help)")
    p.set_defaults(func=scale_command)


def parse_world_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"world sizes must be positive integers, got {text!r}")
    return sizes


def scale_command(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    failed: list[int] = []
    try:
        if args.from_runs:
            if train_args:
                raise ConfigError("--from-runs only builds a report: drop the train flags after --")
            run_dirs = find_runs([Path(d) for d in args.from_runs])
            out = Path(args.out or args.from_runs[0])
        else:
            if args.wandb and "--wandb" not in train_args:
                train_args = [*train_args, "--wandb"]  # scale --wandb: the runs and the summary
            plan = make_plan(args, train_args)
            run_dirs, failed = run_sweep(plan)
            out = Path(args.out) if args.out else plan.root
        rows = scaling_rows(run_dirs)
        files = write_report(rows, out)
    except ConfigError as e:
        print(f"ddp-mnist scale: error: {e}", file=sys.stderr)
        return 1 if failed else 2  # 1: runs failed (their logs say why); 2: a wrong request
    log_summary_run(rows, files, run_dirs, args.wandb)
    print(files[REPORT_MD].read_text())
    print("report: " + ", ".join(str(p) for p in files.values()))
    if failed:
        print(f"ddp-mnist scale: world size(s) {', '.join(map(str, failed))} failed; see their train.log",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------- running the sweep on this node
@dataclasses.dataclass
class Plan:
    world_sizes: list[int]
    mode: str
    batch: int  # strong: global batch; weak: per-rank batch
    root: Path
    train_args: list[str]
    cfg: TrainConfig  # the train flags, resolved

    def global_batch(self, world_size: int) -> int:
        return self.batch if self.mode == "strong" else self.batch * world_size

    def run_dir(self, world_size: int) -> Path:
        return self.root / f"ws{world_size}"


def make_plan(args: argparse.Namespace, train_args: list[str]) -> Plan:
    """Check everything before the first run: the train flags, and the batch at every world size."""
    owned = [a for a in train_args if a.split("=")[0] in OWN_FLAGS]
    if owned:
        raise ConfigError(f"{', '.join(owned)}: the harness sets these for every run (use scale's "
                          f"--batch-size and --run-root); remove them from the train flags")
    parser = argparse.ArgumentParser(prog="ddp-mnist scale ... --", formatter_class=HelpFormatter)
    add_train_arguments(parser)
    cfg = config_from_args(parser.parse_args(train_args)).resolved()
    sizes = args.world_sizes
    if args.batch_size is not None:
        batch = args.batch_size
    else:
        batch = cfg.batch_size if args.mode == "strong" else cfg.batch_size // sizes[0]
    if batch < 1:
        raise ConfigError(f"--batch-size must be a positive number, got {batch}")
    root = Path(args.run_root or f"runs/scale-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
    plan = Plan(sizes, args.mode, batch, root, train_args, cfg)
    for n in sizes:
        run_cfg = dataclasses.replace(cfg, batch_size=plan.global_batch(n))
        run_cfg.validate()
        run_cfg.check_world_size(n)  # says which batch would fit
    return plan


def run_sweep(plan: Plan) -> tuple[list[Path], list[int]]:
    """One torchrun per world size, one after another. Finished runs are kept (re-running the command
    continues a sweep); an interrupted one is resumed from its checkpoint."""
    done, failed = [], []
    for n in plan.world_sizes:
        run_dir, batch = plan.run_dir(n), plan.global_batch(n)
        if (run_dir / "results.json").exists():
            check_finished(run_dir, n, batch)
            log.info("ws%d: %s already finished, kept", n, run_dir)
            done.append(run_dir)
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        log_file = run_dir / "train.log"
        log.info("ws%d: global batch %d (%d per rank) -> %s (log: %s)", n, batch, batch // n, run_dir, log_file)
        started = time.perf_counter()
        code = launch(torchrun_command(n, run_args(plan, n)), log_file)
        if code != 0:
            tail = log_file.read_text(errors="replace").splitlines()[-15:]
            log.error("ws%d: failed with exit code %d; last lines of %s:\n  %s", n, code, log_file, "\n  ".join(tail))
            failed.append(n)
            continue
        steady = read_results(run_dir).get("steady_samples_per_second")
        log.info("ws%d: done in %.0f s, %s samples/s steady", n, time.perf_counter() - started,
                 f"{steady:,.0f}" if steady else "n/a")
        done.append(run_dir)
    return done, failed


def run_args(plan: Plan, n: int) -> list[str]:
    args = ["--no-progress", *plan.train_args, "--run-dir", str(plan.run_dir(n)),
            "--batch-size", str(plan.global_batch(n)), "--expected-world-size", str(n), "--resume"]
    if plan.cfg.wandb:  # every run of the sweep in one W&B group
        group = plan.cfg.wandb_group or os.environ.get("WANDB_RUN_GROUP") or plan.root.name
        name = f"{plan.cfg.wandb_name}-ws{n}" if plan.cfg.wandb_name else f"ws{n}"
        args += ["--wandb-group", group, "--wandb-name", name]
    return args


def torchrun_command(n: int, train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
            "-m", "ddp_mnist", "train", *train_args]


def launch(command: list[str], log_file: Path) -> int:
    env = dict(os.environ)
    # The same threads per rank at every world size (torchrun's own default, but only for N > 1).
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached torchrun and its ranks too: let them checkpoint and stop
            proc.wait()
            raise


def check_finished(run_dir: Path, world_size: int, batch: int) -> None:
    results = read_results(run_dir)
    if (results.get("world_size"), results.get("batch_size")) != (world_size, batch):
        raise ConfigError(f"{run_dir} already holds a finished run at world size {results.get('world_size')}, "
                          f"batch {results.get('batch_size')}, not {world_size} and {batch}; choose a new --run-root")


# ---------------------------------------------------------------------- the report
def find_runs(folders: list[Path]) -> list[Path]:
    """Run folders (with results.json), given directly or as a sweep's RUN_ROOT/ws*/."""
    runs = []
    for folder in folders:
        if (folder / "results.json").exists():
            runs.append(folder)
            continue
        found = sorted(d for d in folder.glob("ws*") if d.is_dir())
        for d in found:
            if (d / "results.json").exists():
                runs.append(d)
            else:
                log.warning("%s: no results.json (unfinished or failed run): left out of the report", d)
        if not found:
            raise ConfigError(f"{folder} is neither a run folder (results.json) nor a sweep folder (ws<N>/ inside)")
    return runs


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
        row["efficiency"] = (row["speedup"] * base["world_size"] / row["world_size"]
                             if row["speedup"] is not None else None)
    return rows


def run_row(run_dir: Path) -> dict[str, Any]:
    r = read_results(run_dir)
    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    epoch_times = [m["epoch_seconds"] for m in metrics if "epoch_seconds" in m]
    return {
        "world_size": r["world_size"], "nodes": r.get("nodes", 1), "batch_size": r["batch_size"],
        "batch_per_rank": r["batch_size"] // r["world_size"], "steps": r["steps"],
        "steady_samples_per_second": r.get("steady_samples_per_second"),
        # The median: the first epoch also holds the start-up steps.
        "epoch_seconds": statistics.median(epoch_times) if epoch_times else None,
        "train_seconds": r["train_seconds"], "time_to_target_seconds": r.get("time_to_target_seconds"),
        "target_accuracy": r.get("target_accuracy"), "test_accuracy": r.get("test_accuracy"),
        "device": r.get("device"), "backend": r.get("backend"), "run_dir": str(run_dir),
    }


def scaling_mode(rows: list[dict[str, Any]]) -> str:
    if len({r["batch_size"] for r in rows}) == 1:
        return "strong"
    return "weak" if len({r["batch_per_rank"] for r in rows}) == 1 else "mixed-batch"


def write_report(rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in (REPORT_CSV, REPORT_MD, REPORT_PNG)}
    with open(files[REPORT_CSV], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if row[k] is None else row[k] for k in COLUMNS} for row in rows)
    files[REPORT_MD].write_text(markdown_table(rows))
    plot(rows, files[REPORT_PNG])
    return files


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
            f"| {_num(r['time_to_target_seconds'], 1, 'not reached')} | {_num(r['test_accuracy'], 2)} |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:,.{digits}f}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Throughput (with the linear ideal) and efficiency against world size. A bare Figure renders with
    Agg: no display, no global pyplot state."""
    from matplotlib.figure import Figure

    sizes = [r["world_size"] for r in rows]
    measured = [(r["world_size"], r["steady_samples_per_second"], r["efficiency"]) for r in rows
                if r["steady_samples_per_second"]]
    base = rows[0]
    fig = Figure(figsize=(8, 3.2), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    if measured and base["steady_samples_per_second"]:
        left.plot(sizes, [base["steady_samples_per_second"] * n / sizes[0] for n in sizes], "--", color="gray",
                  label="linear")
    left.plot([m[0] for m in measured], [m[1] for m in measured], "o-", label="measured")
    left.set(xlabel="world size (ranks)", ylabel="samples/s (steady state)", title="Throughput", ylim=(0, None))
    left.legend()
    right.axhline(100, ls="--", color="gray")
    right.plot([m[0] for m in measured if m[2] is not None], [100 * m[2] for m in measured if m[2] is not None], "o-")
    right.set(xlabel="world size (ranks)", ylabel="% of linear", title="Parallel efficiency",
              ylim=(0, max([110] + [100 * m[2] + 10 for m in measured if m[2] is not None])))
    for ax in (left, right):
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{scaling_mode(rows)} scaling, {base['device']} ({base['backend']})")
    fig.savefig(path)


# ---------------------------------------------------------------------- W&B
def log_summary_run(rows: list[dict[str, Any]], files: dict[str, Path], run_dirs: list[Path],
                    wanted: bool | None) -> None:
    """A summary run in the runs' W&B group, with the table and the plot. Never fails the report."""
    configs = [_wandb_settings(d) for d in run_dirs]
    tracked = [c for c in configs if c.get("wandb")]
    if not (wanted if wanted is not None else tracked):
        return
    cfg = (tracked or configs or [{}])[0]
    groups = {c.get("wandb_group") for c in tracked}
    if len(groups) > 1:
        log.warning("W&B: the runs are in several groups %s; the summary run goes to %s", sorted(map(str, groups)),
                    cfg.get("wandb_group"))
    from .tracking import import_wandb, init_run

    try:
        wandb = import_wandb()
        run = init_run(mode=cfg.get("wandb_mode"), job_type="scaling-summary", name="scaling-summary",
                       project=cfg.get("wandb_project") or os.environ.get("WANDB_PROJECT") or "ddp-mnist",
                       entity=cfg.get("wandb_entity"), group=cfg.get("wandb_group"),
                       tags=cfg.get("wandb_tags") or None,
                       dir=None if os.environ.get("WANDB_DIR") else str(files[REPORT_CSV].parent),
                       config={"mode": scaling_mode(rows), "world_sizes": [r["world_size"] for r in rows],
                               "runs": [str(d) for d in run_dirs]})
        table = wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows])
        run.log({"scaling/table": table, "scaling/plot": wandb.Image(str(files[REPORT_PNG])),
                 "scaling/throughput": wandb.plot.line(table, "world_size", "steady_samples_per_second",
                                                       title="steady samples/s against world size"),
                 "scaling/efficiency": wandb.plot.line(table, "world_size", "efficiency",
                                                       title="parallel efficiency against world size")})
        run.summary.update({f"efficiency/ws{r['world_size']}": r["efficiency"] for r in rows})
        run.finish()
        log.info("W&B summary run %s in group %s", run.id, cfg.get("wandb_group"))
    except Exception as e:  # noqa: BLE001 - the report files are written already
        log.warning("W&B summary run failed (%s: %s); the report files are unaffected", type(e).__name__, e)


def _wandb_settings(run_dir: Path) -> dict[str, Any]:
    """The run's W&B flags (config.json), with where its run really went (tracker.json): a group or
    project given through WANDB_* variables, as in the SLURM sweep, is only known there."""
    cfg, where = _read_json(run_dir / "config.json"), _read_json(run_dir / "tracker.json")
    if where.get("run_id"):
        cfg.update(wandb=True, **{f"wandb_{k}": where[k] for k in ("project", "entity", "group") if where.get(k)})
    return cfg


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

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

Why it scales so (--bench, on by default): after each run, comm_bench.py runs under torchrun at the same
world size and times the step's compute (all ranks at once, no all-reduce) and the process group's
all-reduce over message sizes (RUN_ROOT/ws<N>/comm_bench.json). The report splits each measured step into
compute, all-reduce, overlap and other, fits perf_model.py's model (1-rank compute, core sharing, ring
all-reduce per DDP bucket), states its error at each world size run here, and predicts weak scaling to
1024 ranks and strong scaling to one sample per rank (prediction.csv, prediction.png).

Variants: each --variant FLAGS is one more experiment (the train flags plus FLAGS) in RUN_ROOT/<name>/;
RUN_ROOT/scaling.* then compares them. Knobs (KNOBS, e.g. --strategy, --comm-hook) are columns of every table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .arguments import HelpFormatter, add_train_arguments, config_from_args, examples
from . import perf_model as pm
from .comm_bench import BENCH_FILE, MAX_BYTES, MIN_BYTES, message_sizes, usable_cores
from .config import ConfigError, TrainConfig
from .run_dir import read_metrics, read_results

log = logging.getLogger("ddp_mnist")

REPORT_CSV, REPORT_MD, REPORT_PNG = "scaling.csv", "scaling.md", "scaling.png"
PREDICTION_CSV, PREDICTION_PNG = "prediction.csv", "prediction.png"
ONE_RANK_BENCH = "bench-1rank.json"  # the 1-rank compute timings, when the sweep has no world size 1
# Train flags that choose how data parallelism runs: one column each, read from each run's results.json
# (Strategy.report), so that sweeps over them share one table.
KNOBS = ("strategy", "comm_hook", "bucket_cap_mb")
# The measured step's parts and the model's prediction of it: filled in by `decompose` (perf_model.py).
EXPLAINED = ("compute_seconds", "compute_seconds_1rank", "compute_slowdown", "sharing_rule", "comm_seconds",
             "overlap_seconds", "other_seconds", "straggler_seconds", "predicted_step_seconds",
             "predicted_samples_per_second", "predicted_efficiency", "prediction_error")
COLUMNS = ("world_size", "nodes", "batch_size", "batch_per_rank", "steps", "steady_samples_per_second",
           "steady_samples_per_second_per_rank", "speedup", "efficiency", "epoch_seconds", "train_seconds",
           "time_to_target_seconds", "target_accuracy", "test_accuracy", "device", "backend", "run_dir",
           *KNOBS,
           # Why (perf_model.py): the measured step, its parts, and the model's prediction of it.
           "step_seconds", *EXPLAINED, "flops_per_sample", "achieved_tflops", "mfu")
PREDICTION_COLUMNS = ("scaling", "world_size", "global_batch", "rank_batch", "compute_seconds", "comm_seconds",
                      "step_seconds", "samples_per_second", "efficiency")
WEAK_UP_TO = 1024
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
    model = p.add_argument_group("the scaling model (perf_model.py)")
    model.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True,
                       help="after each run, time its compute and all-reduce sweep (comm_bench.py) for the "
                            "decomposition and the model (default: on)")
    model.add_argument("--min-bytes", type=int, default=MIN_BYTES, metavar="BYTES",
                       help="smallest all-reduce of the sweep (default: 4 KiB)")
    model.add_argument("--max-bytes", type=int, default=MAX_BYTES, metavar="BYTES",
                       help="largest all-reduce of the sweep (default: 64 MiB)")
    model.add_argument("--bench-steps", type=int, default=50, metavar="N", help="timed compute steps per batch (default: 50)")
    model.add_argument("--link-gbps", type=float, default=None, metavar="GBPS",
                       help="predict for a target cluster's link (Gb/s, e.g. 400) (default: the measured link)")
    model.add_argument("--latency-us", type=float, default=None, metavar="US",
                       help="the target link's latency per ring step (us, e.g. 10); with --link-gbps "
                            "(default: the measured latency)")
    p.add_argument("--variant", action="append", default=None, metavar="FLAGS",
                   help="one experiment per --variant: these train flags added to the ones after --, run into "
                        "RUN_ROOT/<flags as a name>/ws<N>/, each with its report, and a comparison in RUN_ROOT, "
                        "e.g. --variant '--comm-hook fp16' --variant '--strategy fsdp' (a single flag: "
                        "--variant=--static-graph)")
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
    failed: list[str] = []
    try:
        if args.from_runs:
            if train_args or getattr(args, "variant", None):
                raise ConfigError("--from-runs only builds a report: drop the train flags after -- and --variant")
            experiments = found_experiments(args)
        else:
            if args.wandb and "--wandb" not in train_args:
                train_args = [*train_args, "--wandb"]  # scale --wandb: the runs and the summary
            experiments = run_experiments(args, train_args, failed)
        link = target_link(args)
        reports = [report_experiment(e, link) for e in experiments]
        combined = write_comparison(reports, experiments[0].out.parent) if len(reports) > 1 else None
    except ConfigError as e:
        print(f"ddp-mnist scale: error: {e}", file=sys.stderr)
        return 1 if failed else 2  # 1: runs failed (their logs say why); 2: a wrong request
    for experiment, (rows, files, model) in zip(experiments, reports):
        log_summary_run(rows, files, experiment.run_dirs, args.wandb, model, experiment.name)
        print(files[REPORT_MD].read_text())
        print("report: " + ", ".join(str(p) for p in files.values()))
    if combined:
        print(combined[REPORT_MD].read_text())
        print("comparison: " + ", ".join(str(p) for p in combined.values()))
    if failed:
        print(f"ddp-mnist scale: {', '.join(failed)} failed; see their train.log", file=sys.stderr)
        return 1
    return 0


@dataclasses.dataclass
class Experiment:
    """One scaling experiment: one set of train flags at several world sizes, and where its report goes."""

    name: str | None  # the variant's name (its folder under RUN_ROOT); None: the only experiment
    run_dirs: list[Path]
    out: Path
    bench_root: Path  # where a 1-rank bench of a sweep without world size 1 lies


def variant_name(flags: list[str]) -> str:
    """A folder name from a variant's train flags: `--strategy zero1 --comm-hook bf16` -> strategy-zero1_comm-hook-bf16."""
    parts, words = [], [f.lstrip("-") for f in flags]
    for word, flag in zip(words, flags):
        if flag.startswith("--"):
            parts.append(word.replace("=", "-"))
        elif parts:
            parts[-1] += f"-{word}"
        else:
            parts.append(word)
    name = "_".join(parts)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "default"


def run_experiments(args: argparse.Namespace, train_args: list[str], failed: list[str]) -> list[Experiment]:
    """Plan every variant first (a wrong flag fails before any run), then run them one after another."""
    variants = getattr(args, "variant", None) or [None]
    root = Path(args.run_root or f"runs/scale-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
    plans = []
    for variant in variants:
        flags = shlex.split(variant) if variant is not None else []
        name = variant_name(flags) if variant is not None else None
        plans.append((name, make_plan(args, [*train_args, *flags], root=root / name if name else root,
                                      group=root.name, label=name)))
    names = [n for n, _ in plans]
    if len(set(names)) != len(names):
        raise ConfigError(f"two --variant flags give the same experiment ({names}); give each different flags")
    experiments = []
    for name, plan in plans:
        run_dirs, sizes = run_sweep(plan)
        failed += [f"{name + ' ' if name else ''}world size {n}" for n in sizes]
        out = Path(args.out) / name if args.out and name else Path(args.out) if args.out else plan.root
        experiments.append(Experiment(name, run_dirs, out, plan.root))
    return experiments


def found_experiments(args: argparse.Namespace) -> list[Experiment]:
    """Run or sweep folders make one experiment; one folder of variant folders (RUN_ROOT/<variant>/ws<N>/)
    makes one per variant."""
    folders = [Path(d) for d in args.from_runs]
    top = folders[0]
    variants = sorted(d for d in top.iterdir() if d.is_dir() and any(d.glob("ws*/results.json"))) \
        if len(folders) == 1 and top.is_dir() and not any(top.glob("ws*")) and not (top / "results.json").exists() \
        else []
    if variants:
        out = Path(args.out or top)
        return [Experiment(d.name, find_runs([d]), out / d.name, d) for d in variants]
    return [Experiment(None, find_runs(folders), Path(args.out or top), top)]


def report_experiment(experiment: Experiment, link: pm.Link | None):
    rows = scaling_rows(experiment.run_dirs)
    model = explain(rows, experiment.run_dirs, experiment.bench_root, link)
    return rows, write_report(rows, experiment.out, model), model


# ---------------------------------------------------------------------- running the sweep on this node
@dataclasses.dataclass
class Plan:
    world_sizes: list[int]
    mode: str
    batch: int  # strong: global batch; weak: per-rank batch
    root: Path
    train_args: list[str]
    cfg: TrainConfig  # the train flags, resolved
    bench_args: list[str] | None = None  # comm_bench's flags; None: no bench
    group: str | None = None  # the W&B group of every run (default: the root folder's name)
    label: str | None = None  # the variant's name, in the W&B run names

    def global_batch(self, world_size: int) -> int:
        return self.batch if self.mode == "strong" else self.batch * world_size

    def run_dir(self, world_size: int) -> Path:
        return self.root / f"ws{world_size}"


def make_plan(args: argparse.Namespace, train_args: list[str], root: Path, group: str | None = None,
              label: str | None = None) -> Plan:
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
    bench = getattr(args, "bench", False)
    if bench:  # comm_bench's own checks, before the first run
        message_sizes(args.min_bytes, args.max_bytes, [])
        if args.bench_steps < 1:
            raise ConfigError(f"--bench-steps must be at least 1, got {args.bench_steps}")
    bench_args = ["--steps", str(args.bench_steps), "--min-bytes", str(args.min_bytes),
                  "--max-bytes", str(args.max_bytes)] if bench else None
    plan = Plan(sizes, args.mode, batch, root, train_args, cfg, bench_args, group, label)
    for n in sizes:
        run_cfg = dataclasses.replace(cfg, batch_size=plan.global_batch(n))
        run_cfg.validate()
        run_cfg.check_world_size(n)  # says which batch would fit
    return plan


def run_sweep(plan: Plan) -> tuple[list[Path], list[int]]:
    """One torchrun per world size, one after another. Finished runs are kept (re-running the command
    continues a sweep); an interrupted one is resumed from its checkpoint."""
    done, failed = [], []
    warn_shared_cores(plan.world_sizes)
    for n in plan.world_sizes:
        run_dir, batch = plan.run_dir(n), plan.global_batch(n)
        if (run_dir / "results.json").exists():
            check_finished(run_dir, n, batch)
            log.info("ws%d: %s already finished, kept", n, run_dir)
            done.append(run_dir)
            run_bench(plan, n)
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        log_file = run_dir / "train.log"
        log.info("ws%d: global batch %d (%d per rank) -> %s (log: %s)", n, batch, batch // n, run_dir, log_file)
        started = time.perf_counter()
        code = launch(torchrun_command(n, ["train", *run_args(plan, n)]), log_file)
        if code != 0:
            tail = log_file.read_text(errors="replace").splitlines()[-15:]
            log.error("ws%d: failed with exit code %d; last lines of %s:\n  %s", n, code, log_file, "\n  ".join(tail))
            failed.append(n)
            continue
        steady = read_results(run_dir).get("steady_samples_per_second")
        log.info("ws%d: done in %.0f s, %s samples/s steady", n, time.perf_counter() - started,
                 f"{steady:,.0f}" if steady else "n/a")
        done.append(run_dir)
        run_bench(plan, n)
    if plan.bench_args is not None and 1 not in plan.world_sizes and done:
        run_bench(plan, 1, config_from=done[0], out=plan.root / ONE_RANK_BENCH)
    return done, failed


def threads_per_rank() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", "1") or 1)


def warn_shared_cores(sizes: list[int]) -> None:
    cores, threads = usable_cores(), threads_per_rank()
    crowded = [n for n in sizes if pm.sharing(n, threads, cores) > 1]
    if crowded:
        log.warning("world size(s) %s run more threads (ranks x %d OMP thread(s)) than this machine's %d cores: "
                    "ranks share cores and slow each other's compute (the report shows by how much)",
                    ", ".join(map(str, crowded)), threads, cores)


def run_bench(plan: Plan, n: int, config_from: Path | None = None, out: Path | None = None) -> None:
    """comm_bench.py under torchrun at world size n, in the run's folder (kept when it is there already).
    World size 1 also times every per-rank batch of the sweep (and a small one): the model's compute(b)."""
    run_dir = config_from or plan.run_dir(n)
    out = out or run_dir / BENCH_FILE
    if plan.bench_args is None or out.exists():
        return
    batches = [plan.global_batch(m) // m for m in plan.world_sizes] if n == 1 else [plan.global_batch(n) // n]
    if n == 1:
        batches.append(max(1, min(batches) // 4))  # a small batch pins down the fixed cost per step
    command = torchrun_command(n, ["--run-dir", str(run_dir), "--out", str(out),
                                   "--rank-batches", ",".join(map(str, sorted(set(batches)))), *plan.bench_args],
                               module="ddp_mnist.comm_bench")
    log.info("ws%d: timing compute and the all-reduce sweep (comm_bench) -> %s", n, out)
    code = launch(command, run_dir / "comm_bench.log")
    if code != 0:
        log.warning("ws%d: comm_bench failed (exit %d; see %s): no decomposition for this world size",
                    n, code, run_dir / "comm_bench.log")


def run_args(plan: Plan, n: int) -> list[str]:
    args = ["--no-progress", *plan.train_args, "--run-dir", str(plan.run_dir(n)),
            "--batch-size", str(plan.global_batch(n)), "--expected-world-size", str(n), "--resume"]
    if plan.cfg.wandb:  # every run of the sweep in one W&B group
        group = plan.cfg.wandb_group or os.environ.get("WANDB_RUN_GROUP") or plan.group or plan.root.name
        prefix = "-".join(p for p in (plan.cfg.wandb_name, plan.label) if p)
        name = f"{prefix}-ws{n}" if prefix else f"ws{n}"
        args += ["--wandb-group", group, "--wandb-name", name]
    return args


def torchrun_command(n: int, args: list[str], module: str = "ddp_mnist") -> list[str]:
    """`torchrun --standalone --nproc-per-node=n -m MODULE ARGS` (this Python's torchrun)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
            "-m", module, *args]


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
        row["efficiency"] = pm.parallel_efficiency(tput, base_tput, row["world_size"], base["world_size"])
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
        **{k: r.get(k) for k in (*KNOBS, "flops_per_sample", "achieved_tflops", "mfu")},
        # The measured step: the global batch over the steady throughput.
        "step_seconds": r["batch_size"] / r["steady_samples_per_second"] if r.get("steady_samples_per_second") else None,
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
        raise ConfigError("--link-gbps and --latency-us name a target link together, e.g. --link-gbps 400 "
                          "--latency-us 10; give both, or neither for the measured link")
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


def explain(rows: list[dict[str, Any]], run_dirs: list[Path], bench_root: Path,
            link: pm.Link | None) -> Explanation | None:
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
    machine = pm.Machine(compute, measured_link, one["gradient_bytes"], one["bucket_cap_mb"],
                         one["threads_per_rank"], one["cores"], one.get("control_allreduces_per_step", 0.0),
                         tuple(bench_messages(one)))
    one_rank = {c["rank_batch"]: c["seconds"] for c in one["compute"]}
    alone = next((r for r in rows if r["world_size"] == 1 and r["step_seconds"]), None)
    if alone and one_rank.get(alone["batch_per_rank"]):  # the 1-rank step beyond its compute: the loop's own cost
        machine = dataclasses.replace(machine, overhead_s=max(alone["step_seconds"] - one_rank[alone["batch_per_rank"]], 0.0))
    for row in rows:
        decompose(row, benches.get(row["world_size"]), one_rank, machine)
    base = rows[0]
    for row in rows:  # predicted efficiency, the same formula as the measured one
        row["predicted_efficiency"] = pm.parallel_efficiency(row["predicted_samples_per_second"],
                                                             base["predicted_samples_per_second"],
                                                             row["world_size"], base["world_size"])
    target = dataclasses.replace(machine, link=link or measured_link, cores=None)
    global_batch, rank_batch = base["batch_size"], base["batch_per_rank"]
    predictions = ([{"scaling": "weak", **dataclasses.asdict(p)}
                    for p in pm.weak_scaling(target, rank_batch, pm.powers_of_two(WEAK_UP_TO))]
                   + [{"scaling": "strong", **dataclasses.asdict(p)}
                      for p in pm.strong_scaling(target, global_batch, pm.powers_of_two(global_batch))])
    for p in predictions:  # the report's names
        p.update(compute_seconds=p.pop("compute_s"), comm_seconds=p.pop("comm_s"), step_seconds=p.pop("step_s"))
    return Explanation(machine, target, "named" if link else "measured", predictions)


def bench_messages(bench: dict) -> list[tuple[float, float]]:
    """The step's messages as comm_bench recorded them (bytes, count); from a bench without them, the
    gradient's buckets and the loop's control all-reduces."""
    if bench.get("messages"):
        return [tuple(m) for m in bench["messages"]]
    return pm.step_messages(bench["gradient_bytes"], bench["bucket_cap_mb"],
                            control=bench.get("control_allreduces_per_step", 0.0))


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
    timing = next((c for c in bench["compute"] if c["rank_batch"] == b), {})
    measured, slowest = timing.get("seconds"), timing.get("seconds_slowest_each_step")
    sweep = [(a["bytes"], a["seconds"]) for a in bench["allreduce"]]
    row["compute_seconds"] = measured
    if slowest is not None and measured is not None:  # what waiting for the slowest rank each step adds
        row["straggler_seconds"] = max(slowest - measured, 0.0)
    row["comm_seconds"] = (sum(k * pm.interpolate_seconds(sweep, x) for x, k in bench_messages(bench))
                           if sweep and n > 1 else 0.0)
    if measured and row["compute_seconds_1rank"]:
        row["compute_slowdown"] = measured / row["compute_seconds_1rank"]
    if measured is not None and row["step_seconds"]:
        row["overlap_seconds"], row["other_seconds"] = pm.overlap(measured, row["comm_seconds"], row["step_seconds"])


def scaling_mode(rows: list[dict[str, Any]]) -> str:
    if len({r["batch_size"] for r in rows}) == 1:
        return "strong"
    return "weak" if len({r["batch_per_rank"] for r in rows}) == 1 else "mixed-batch"


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
        "", "Why: the measured step (global batch / steady samples/s) and its parts. Compute: forward, backward, "
        "optimizer and data on each rank with no all-reduce, timed in all ranks at once (comm_bench.py); "
        "all-reduce: the process group's own, at the gradient's size, per DDP bucket, plus the loop's tiny "
        "control all-reduces (stop-signal and loss checks); overlap = compute + "
        "all-reduce - step, clamped to [0, min(compute, all-reduce)]; other = what neither explains (data "
        "waits, Python, waiting for the slowest rank); slowest rank: how much longer than compute "
        "(the slowest rank's mean) the steps take when each waits for its slowest rank (part of other). Predicted: 1-rank compute x the "
        "core-sharing rule "
        "max(1, ranks x threads / cores) + the loop's overhead (the 1-rank step minus its compute) + the fitted "
        "ring all-reduce; error = predicted / measured - 1.", "",
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
            f"| {r['world_size']} | " + "".join(f"{_num_or(r.get(k))} | " for k in knobs)
            + f"{_ms(r['step_seconds'])} | {_ms(r['compute_seconds'])} | {_ms(r['compute_seconds_1rank'])} "
            f"| {slowdown} | {_ms(r['comm_seconds'])} | {_ms(r['overlap_seconds'])} | {_ms(r['other_seconds'])} "
            f"| {_ms(r['straggler_seconds'])} | {_ms(r['predicted_step_seconds'])} | {error} "
            f"| {_num(None if r['flops_per_sample'] is None else r['flops_per_sample'] / 1e9, 4)} "
            f"| {_num(r['achieved_tflops'], 4)} | {_num(None if r['mfu'] is None else 100 * r['mfu'], 1)}"
            f"{'%' if r['mfu'] is not None else ''} |")
    buckets = pm.buckets(m.gradient_bytes, m.bucket_cap_mb)
    lines += [
        "", f"Model: compute(b) = {1e3 * m.compute.fixed_s:.3f} ms + {1e6 * m.compute.per_sample_s:.2f} us x b "
        f"(1 rank alone), plus the loop's overhead of {1e3 * m.overhead_s:.2f} ms per step; ring all-reduce t = 2(N-1) x {1e6 * m.link.latency_s:.1f} us + 2(N-1)/N x bytes / "
        f"{m.link.bandwidth_Bps / 1e9:.3f} GB/s (fitted to the all-reduce sweeps); gradient "
        f"{m.gradient_bytes / pm.MB:.2f} MiB in {len(buckets)} bucket(s) of {m.bucket_cap_mb:g} MiB (one bucket: "
        f"its all-reduce starts after backward, nothing overlaps); {m.threads_per_rank} thread(s) per rank on "
        f"{m.cores} core(s); per step, as all-reduce equivalents (bytes x count; the strategy, the hook's "
        f"compression, and {m.control:.2f} control all-reduce(s)): "
        + ", ".join(f"{nbytes:,.0f} x {count:.2f}" for nbytes, count in m.step_messages()) + ".",
        "", f"Predicted beyond this machine (prediction.csv, prediction.png): one rank per device, {model.link_source} "
        f"link ({1e6 * t.link.latency_s:.1f} us, {t.link.bandwidth_Bps / 1e9:.2f} GB/s).", "",
        "| scaling | world size | global batch | per-rank batch | step (ms) | compute (ms) | all-reduce (ms) "
        "| samples/s | efficiency |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in model.predictions:
        if p["world_size"] in (1, 2, 8, 64, 1024) or p["world_size"] == p["global_batch"]:
            lines.append(f"| {p['scaling']} | {p['world_size']} | {p['global_batch']} | {p['rank_batch']:g} "
                         f"| {_ms(p['step_seconds'])} | {_ms(p['compute_seconds'])} | {_ms(p['comm_seconds'])} "
                         f"| {_num(p['samples_per_second'], 0)} | {100 * p['efficiency']:.0f}% |")
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
            f"| {_num(r['time_to_target_seconds'], 1, 'not reached')} | {_num(r['test_accuracy'], 2)} |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:,.{digits}f}"


def _ms(seconds: float | None) -> str:
    return _num(None if seconds is None else 1e3 * seconds, 2)


def _percent_error(error: float | None) -> str:
    return "n/a" if error is None else f"{100 * error:+.0f}%"


def _two_panels(width: float, height: float):
    """A figure with two plots side by side (throughput, efficiency). A bare Figure renders with Agg: no
    display, no global pyplot state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    return fig, left, right


def _points(rows: list[dict[str, Any]], key: str, scale: float = 1) -> tuple[list[int], list[float]]:
    """The rows that have a value for `key` (neither None nor 0): their world sizes, and the values x scale."""
    have = [r for r in rows if r.get(key)]
    return [r["world_size"] for r in have], [scale * r[key] for r in have]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Throughput (with the linear ideal) and efficiency against world size."""
    sizes = [r["world_size"] for r in rows]
    base = rows[0]
    fig, left, right = _two_panels(8, 3.2)
    if base["steady_samples_per_second"]:
        left.plot(sizes, [base["steady_samples_per_second"] * n / sizes[0] for n in sizes], "--", color="gray",
                  label="linear")
    left.plot(*_points(rows, "steady_samples_per_second"), "o-", label="measured")
    left.set(xlabel="world size (ranks)", ylabel="samples/s (steady state)", title="Throughput", ylim=(0, None))
    left.legend()
    right.axhline(100, ls="--", color="gray")
    sizes_measured, efficiency = _points(rows, "efficiency", 100)
    right.plot(sizes_measured, efficiency, "o-")
    right.set(xlabel="world size (ranks)", ylabel="% of linear", title="Parallel efficiency",
              ylim=(0, max([110] + [e + 10 for e in efficiency])))
    if any(r.get("predicted_samples_per_second") for r in rows):
        # the model's prediction at each measured world size (1-rank timings + the all-reduce fit)
        left.plot(*_points(rows, "predicted_samples_per_second"), "x--", label="predicted")
        left.legend()
        right.plot(*_points(rows, "predicted_efficiency", 100), "x--", label="predicted")
    for ax in (left, right):
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{scaling_mode(rows)} scaling, {base['device']} ({base['backend']})")
    fig.savefig(path)


def write_comparison(reports: list, out: Path) -> dict[str, Path]:
    """The variants side by side in `out`: scaling.csv (every row, with its variant), scaling.md (a
    comparison table) and scaling.png (throughput and efficiency, one line per variant)."""
    variants = [(Path(files[REPORT_CSV]).parent.name, row_list) for row_list, files, _ in reports]  # folder = name
    rows = [{"variant": name, **row} for name, row_list in variants for row in row_list]
    files = {name: out / name for name in (REPORT_CSV, REPORT_MD, REPORT_PNG)}
    write_csv(files[REPORT_CSV], ("variant", *COLUMNS), rows)
    lines = ["Variants compared (each variant's folder has its full report).", "",
             "| variant | world size | samples/s | efficiency | step (ms) | compute (ms) | all-reduce (ms) "
             "| overlap (ms) | other (ms) | predicted (ms) | error | test accuracy (%) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        error = _percent_error(r["prediction_error"])
        lines.append(f"| {r['variant']} | {r['world_size']} | {_num(r['steady_samples_per_second'], 0)} "
                     f"| {_num(None if r['efficiency'] is None else 100 * r['efficiency'], 0)}% "
                     f"| {_ms(r['step_seconds'])} | {_ms(r['compute_seconds'])} | {_ms(r['comm_seconds'])} "
                     f"| {_ms(r['overlap_seconds'])} | {_ms(r['other_seconds'])} | {_ms(r['predicted_step_seconds'])} "
                     f"| {error} | {_num(r['test_accuracy'], 2)} |")
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


def plot_prediction(rows: list[dict[str, Any]], model: Explanation, path: Path) -> None:
    """Predicted throughput and efficiency against world size (log scale), weak to 1024 ranks and strong to
    the global batch, one rank per device; the measured points (this machine) beside them."""
    fig, left, right = _two_panels(9, 3.4)
    for scaling, style in (("weak", "-"), ("strong", "--")):
        curve = [p for p in model.predictions if p["scaling"] == scaling]
        label = (f"weak, {curve[0]['rank_batch']:g}/rank" if scaling == "weak"
                 else f"strong, batch {curve[0]['global_batch']}")
        left.plot([p["world_size"] for p in curve], [p["samples_per_second"] for p in curve], style,
                  label=f"predicted {label}")
        right.plot([p["world_size"] for p in curve], [100 * p["efficiency"] for p in curve], style,
                   label=f"predicted {label}")
    left.plot(*_points(rows, "steady_samples_per_second"), "o", label="measured (this machine)")
    right.plot(*_points(rows, "efficiency", 100), "o", label="measured")
    # the model with this machine's cores, at the world sizes measured here
    left.plot(*_points(rows, "predicted_samples_per_second"), "x", label="predicted (this machine)")
    right.plot(*_points(rows, "predicted_efficiency", 100), "x", label="predicted (this machine)")
    left.set(xscale="log", yscale="log", xlabel="world size (ranks)", ylabel="samples/s", title="Throughput")
    right.set(xscale="log", xlabel="world size (ranks)", ylabel="% of linear", title="Parallel efficiency",
              ylim=(0, 110))
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    link = model.target.link
    fig.suptitle(f"Predicted: one rank per device, {model.link_source} link "
                 f"({1e6 * link.latency_s:.1f} us, {link.bandwidth_Bps / 1e9:.2f} GB/s)")
    fig.savefig(path)


# ---------------------------------------------------------------------- W&B
def log_summary_run(rows: list[dict[str, Any]], files: dict[str, Path], run_dirs: list[Path],
                    wanted: bool | None, model: Explanation | None = None, variant: str | None = None) -> None:
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
        run = init_run(mode=cfg.get("wandb_mode"), job_type="scaling-summary",
                       name=f"scaling-summary-{variant}" if variant else "scaling-summary",
                       project=cfg.get("wandb_project") or os.environ.get("WANDB_PROJECT") or "ddp-mnist",
                       entity=cfg.get("wandb_entity"), group=cfg.get("wandb_group"),
                       tags=cfg.get("wandb_tags") or None,
                       dir=None if os.environ.get("WANDB_DIR") else str(files[REPORT_CSV].parent),
                       config={"mode": scaling_mode(rows), "world_sizes": [r["world_size"] for r in rows],
                               "runs": [str(d) for d in run_dirs]})
        table = wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows])
        logged = {"scaling/table": table, "scaling/plot": wandb.Image(str(files[REPORT_PNG])),
                  "scaling/throughput": wandb.plot.line(table, "world_size", "steady_samples_per_second",
                                                        title="steady samples/s against world size"),
                  "scaling/efficiency": wandb.plot.line(table, "world_size", "efficiency",
                                                        title="parallel efficiency against world size")}
        if model is not None:  # the model: its predictions (table, plot) and its error at each measured size
            logged["prediction/table"] = wandb.Table(columns=list(PREDICTION_COLUMNS),
                                                     data=[[p[c] for c in PREDICTION_COLUMNS] for p in model.predictions])
            logged["prediction/plot"] = wandb.Image(str(files[PREDICTION_PNG]))
        run.log(logged)
        run.summary.update({f"efficiency/ws{r['world_size']}": r["efficiency"] for r in rows})
        if model is not None:
            run.summary.update({f"prediction_error/ws{r['world_size']}": r["prediction_error"] for r in rows})
            run.summary.update({"model/latency_us": 1e6 * model.machine.link.latency_s,
                                "model/bandwidth_GBps": _finite(model.machine.link.bandwidth_Bps / 1e9)})
        run.finish()
        log.info("W&B summary run %s in group %s", run.id, cfg.get("wandb_group"))
    except Exception as e:  # noqa: BLE001 - the report files are written already
        log.warning("W&B summary run failed (%s: %s); the report files are unaffected", type(e).__name__, e)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # inf: no bandwidth limit seen (perf_model.fit_link)


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

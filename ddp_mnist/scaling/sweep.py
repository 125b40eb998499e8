"""The scaling sweep: the same training at several world sizes (and variants), each a torchrun job in its
own run folder, with the all-reduce benchmark beside it."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ddp_mnist.artifacts.run_dir import read_results
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.errors import ConfigError
from ddp_mnist.scaling import perf_model as pm
from ddp_mnist.scaling.comm_bench import BENCH_FILE, message_sizes, usable_cores

log = logging.getLogger("ddp_mnist")


ONE_RANK_BENCH = "bench-1rank.json"  # the 1-rank compute timings, when the sweep has no world size 1


# Train flags that choose how data parallelism runs: one column each, read from each run's results.json
# (Strategy.report), so that sweeps over them share one table.
KNOBS = ("strategy", "comm_hook", "bucket_cap_mb")


@dataclasses.dataclass
class Experiment:
    """One scaling experiment: one set of train flags at several world sizes, and where its report goes."""

    name: str | None  # the variant's name (its folder under RUN_ROOT); None: the only experiment
    run_dirs: list[Path]
    out: Path
    bench_root: Path  # where a 1-rank bench of a sweep without world size 1 lies


# Flags the harness sets for every run: not accepted among the train flags.
OWN_FLAGS = ("--run-dir", "--batch-size", "--resume", "--expected-world-size")

ParseTrain = Callable[[list[str]], TrainConfig]


def variant_name(flags: list[str]) -> str:
    """A folder name from a variant's train flags:
    `--strategy zero1 --comm-hook bf16` -> strategy-zero1_comm-hook-bf16."""
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


def run_experiments(
    args: argparse.Namespace, train_args: list[str], parse_train: ParseTrain, failed: list[str]
) -> list[Experiment]:
    """Plan every variant first (a wrong flag fails before any run), then run them one after another.
    `parse_train`: the train flags -> their config (the command's parser)."""
    variants = getattr(args, "variant", None) or [None]
    root = Path(args.run_root or f"runs/scale-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
    plans = []
    for variant in variants:
        flags = shlex.split(variant) if variant is not None else []
        name = variant_name(flags) if variant is not None else None
        plans.append(
            (
                name,
                make_plan(
                    args,
                    [*train_args, *flags],
                    parse_train,
                    root=root / name if name else root,
                    group=root.name,
                    label=name,
                ),
            )
        )
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
    variants = (
        sorted(d for d in top.iterdir() if d.is_dir() and any(d.glob("ws*/results.json")))
        if len(folders) == 1
        and top.is_dir()
        and not any(d.is_dir() for d in top.glob("ws*"))  # (files beside: slurm/sweep.sh ARRAY=1's plans, logs)
        and not (top / "results.json").exists()
        else []
    )
    if variants:
        out = Path(args.out or top)
        return [Experiment(d.name, find_runs([d]), out / d.name, d) for d in variants]
    return [Experiment(None, find_runs(folders), Path(args.out or top), top)]


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


def make_plan(
    args: argparse.Namespace,
    train_args: list[str],
    parse_train: ParseTrain,
    root: Path,
    group: str | None = None,
    label: str | None = None,
) -> Plan:
    """Check everything before the first run: the train flags, and the batch at every world size."""
    owned = [a for a in train_args if a.split("=")[0] in OWN_FLAGS]
    if owned:
        raise ConfigError(
            f"{', '.join(owned)}: the harness sets these for every run (use scale's "
            f"--batch-size and --run-root); remove them from the train flags"
        )
    cfg = parse_train(train_args).resolved()
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
    bench_args = (
        ["--steps", str(args.bench_steps), "--min-bytes", str(args.min_bytes), "--max-bytes", str(args.max_bytes)]
        if bench
        else None
    )
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
        log.info(
            "ws%d: done in %.0f s, %s samples/s steady",
            n,
            time.perf_counter() - started,
            f"{steady:,.0f}" if steady else "n/a",
        )
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
        log.warning(
            "world size(s) %s run more threads (ranks x %d OMP thread(s)) than this machine's %d cores: "
            "ranks share cores and slow each other's compute (the report shows by how much)",
            ", ".join(map(str, crowded)),
            threads,
            cores,
        )


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
    command = torchrun_command(
        n,
        [
            "--run-dir",
            str(run_dir),
            "--out",
            str(out),
            "--rank-batches",
            ",".join(map(str, sorted(set(batches)))),
            *plan.bench_args,
        ],
        module="ddp_mnist.scaling.comm_bench",
    )
    log.info("ws%d: timing compute and the all-reduce sweep (comm_bench) -> %s", n, out)
    code = launch(command, run_dir / "comm_bench.log")
    if code != 0:
        log.warning(
            "ws%d: comm_bench failed (exit %d; see %s): no decomposition for this world size",
            n,
            code,
            run_dir / "comm_bench.log",
        )


def run_args(plan: Plan, n: int) -> list[str]:
    args = [
        "--no-progress",
        *plan.train_args,
        "--run-dir",
        str(plan.run_dir(n)),
        "--batch-size",
        str(plan.global_batch(n)),
        "--expected-world-size",
        str(n),
        "--resume",
    ]
    if plan.cfg.wandb:  # every run of the sweep in one W&B group
        group = plan.cfg.wandb_group or os.environ.get("WANDB_RUN_GROUP") or plan.group or plan.root.name
        prefix = "-".join(p for p in (plan.cfg.wandb_name, plan.label) if p)
        name = f"{prefix}-ws{n}" if prefix else f"ws{n}"
        args += ["--wandb-group", group, "--wandb-name", name]
    return args


def torchrun_command(n: int, args: list[str], module: str = "ddp_mnist") -> list[str]:
    """`torchrun --standalone --nproc-per-node=n -m MODULE ARGS` (this Python's torchrun)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", module, *args]


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
        raise ConfigError(
            f"{run_dir} already holds a finished run at world size {results.get('world_size')}, "
            f"batch {results.get('batch_size')}, not {world_size} and {batch}; choose a new --run-root"
        )


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

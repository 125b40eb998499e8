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
import logging
import sys

from ddp_mnist.commands.arguments import HelpFormatter, add_train_arguments, bounded, config_from_args, examples
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.config.validation import RANGES
from ddp_mnist.errors import ConfigError
from ddp_mnist.scaling.analysis import target_link
from ddp_mnist.scaling.comm_bench import MAX_BYTES, MIN_BYTES
from ddp_mnist.scaling.report import REPORT_MD, log_summary_run, log_tensorboard, report_experiment, write_comparison
from ddp_mnist.scaling.sweep import found_experiments, run_experiments

# Flags the harness sets for every run; in the train flags they would contradict the sweep.


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run `ddp-mnist train` at several world sizes on this node (torchrun), or read finished "
        "runs (--from-runs), and write scaling.csv, scaling.md and scaling.png."
    )
    p.epilog = examples(
        "ddp-mnist scale --world-sizes 1,2,4 -- --model cnn --epochs 1",
        "ddp-mnist scale --mode weak --batch-size 128 --world-sizes 1,2 -- --max-steps 200",
        "ddp-mnist scale --from-runs runs/sweep-cnn        # the report of a SLURM sweep",
    )
    p.add_argument(
        "--world-sizes",
        type=parse_world_sizes,
        default=[1, 2],
        metavar="N,N,...",
        help="world sizes to run, e.g. 1,2,4",
    )
    p.add_argument(
        "--mode",
        choices=("strong", "weak"),
        default="strong",
        help="strong: fixed global batch; weak: fixed per-rank batch",
    )
    p.add_argument(
        "--batch-size",
        type=bounded(int, *RANGES["batch_size"]),
        default=None,
        metavar="N",
        help="strong: the global batch of every run; weak: the per-rank batch (default: recipe; for "
        "weak, the recipe's batch split over the smallest world size)",
    )
    p.add_argument(
        "--run-root",
        default=None,
        metavar="DIR",
        help="folder holding the runs as DIR/ws<N>/ (default: runs/scale-<mode>-<time>)",
    )
    p.add_argument(
        "--from-runs",
        nargs="+",
        default=None,
        metavar="DIR",
        help="only build the report, from sweep folders (DIR/ws*/) or run folders (DIR/results.json)",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="report folder (default: the run root, or the first --from-runs DIR)"
    )
    p.add_argument(
        "--wandb",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log every run and a summary run (the table and the plot) to W&B, in one group "
        "(default: when the runs log to W&B, i.e. --wandb among the train flags)",
    )
    p.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the table, the plots and the scalars to REPORT/tensorboard/ (default: when the runs write "
        "TensorBoard, i.e. --tensorboard among the train flags)",
    )
    model = p.add_argument_group("the scaling model (perf_model.py)")
    model.add_argument(
        "--bench",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after each run, time its compute and all-reduce sweep (comm_bench.py) for the "
        "decomposition and the model (default: on)",
    )
    model.add_argument(
        "--min-bytes",
        type=bounded(int, 1, 2**40),
        default=MIN_BYTES,
        metavar="BYTES",
        help="smallest all-reduce of the sweep (default: 4 KiB)",
    )
    model.add_argument(
        "--max-bytes",
        type=bounded(int, 1, 2**40),
        default=MAX_BYTES,
        metavar="BYTES",
        help="largest all-reduce of the sweep (default: 64 MiB)",
    )
    model.add_argument(
        "--bench-steps",
        type=bounded(int, 1, 1_000_000),
        default=50,
        metavar="N",
        help="timed compute steps per batch (default: 50)",
    )
    model.add_argument(
        "--link-gbps",
        type=bounded(float, 1e-6, 1e9),
        default=None,
        metavar="GBPS",
        help="predict for a target cluster's link (Gb/s, e.g. 400) (default: the measured link)",
    )
    model.add_argument(
        "--latency-us",
        type=bounded(float, 0, 1e9),
        default=None,
        metavar="US",
        help="the target link's latency per ring step (us, e.g. 10); with --link-gbps (default: the measured latency)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="FLAGS",
        help="one experiment per --variant: these train flags added to the ones after --, run into "
        "RUN_ROOT/<flags as a name>/ws<N>/, each with its report, and a comparison in RUN_ROOT, "
        "e.g. --variant '--comm-hook fp16' --variant '--strategy fsdp' (a single flag: "
        "--variant=--static-graph)",
    )
    p.add_argument(
        "train_args",
        nargs=argparse.REMAINDER,
        metavar="-- TRAIN FLAGS",
        help="flags for every `ddp-mnist train` run, e.g. -- --model cnn --epochs 1 --wandb "
        "(see ddp-mnist train --help)",
    )
    p.set_defaults(func=scale_command)


def parse_world_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"world sizes must be positive integers, got {text!r}")
    return sizes


def train_config(train_args: list[str]) -> TrainConfig:
    """The train flags after `--`, parsed as `ddp-mnist train` parses them."""
    parser = argparse.ArgumentParser(prog="ddp-mnist scale ... --", formatter_class=HelpFormatter)
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(train_args))


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
            experiments = run_experiments(args, train_args, train_config, failed)
        link = target_link(args)
        reports = [report_experiment(e, link) for e in experiments]
        combined = write_comparison(reports, experiments[0].out.parent) if len(reports) > 1 else None
    except ConfigError as e:
        print(f"ddp-mnist scale: error: {e}", file=sys.stderr)
        return 1 if failed else 2  # 1: runs failed (their logs say why); 2: a wrong request
    for experiment, (rows, files, model) in zip(experiments, reports):
        log_summary_run(rows, files, experiment.run_dirs, args.wandb, model, experiment.name)
        if board := log_tensorboard(rows, files, experiment.run_dirs, args.tensorboard, files[REPORT_MD].parent):
            print(f"TensorBoard: {board}")
        print(files[REPORT_MD].read_text())
        print("report: " + ", ".join(str(p) for p in files.values()))
    if combined:
        print(combined[REPORT_MD].read_text())
        print("comparison: " + ", ".join(str(p) for p in combined.values()))
    if failed:
        print(f"ddp-mnist scale: {', '.join(failed)} failed; see their train.log", file=sys.stderr)
        return 1
    return 0

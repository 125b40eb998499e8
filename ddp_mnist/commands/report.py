"""`ddp-mnist report RUN_DIR`: the run's curves per epoch (train loss, test accuracy, samples/s) as a PNG.

Drawn from metrics.jsonl with matplotlib's object API (a Figure on the Agg canvas): no display, no pyplot
state, so it works on a login node or inside a job.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ddp_mnist.artifacts.run_dir import RunDir, read_metrics, read_results
from ddp_mnist.commands.arguments import examples
from ddp_mnist.errors import ConfigError
from ddp_mnist.files import atomic_write
from ddp_mnist.training.evaluation import format_accuracy

REPORT_FILE = "report.png"


WIDTH, HEIGHT, DPI = 1500, 450, 100  # pixels: three panels side by side


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows (one per finished epoch), or an error that says why there are none."""
    rows = read_metrics(run_dir) if RunDir(run_dir).metrics.exists() else []  # damage: one line naming the file
    if not rows:
        hint = (
            "it has not finished an epoch yet"
            if RunDir(run_dir).config.exists()
            else "it is not a run folder (no config.json)"
        )
        raise ConfigError(f"{run_dir} has no metrics to draw (metrics.jsonl is missing or empty): {hint}")
    return rows


def draw(run_dir: Path, out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = read_rows(run_dir)
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the canvas that renders PNGs; no display is ever opened
    panels = [
        ("train loss", "train_loss", ""),
        ("test accuracy", "test_accuracy", "%"),
        ("throughput", "samples_per_second", "samples/s"),
    ]
    for ax, (title, key, unit) in zip(fig.subplots(1, len(panels)), panels):
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]  # --eval-every skips epochs
        ax.plot([e for e, _ in points], [v for _, v in points], marker="o")
        ax.set(title=title, xlabel="epoch", ylabel=unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(_title(RunDir(run_dir)))
    try:
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=DPI))
    except OSError as e:
        raise ConfigError(f"cannot write {out} ({e.strerror}); choose another --out FILE") from None
    return out


def _title(run: RunDir) -> str:
    """The run folder's name, what it trained, and its final accuracy when it has finished."""
    parts = [run.path.resolve().name]  # runs/latest: name the run it points to
    try:
        results = read_results(run.path)
        parts.append(
            f"{results['model']}/{results['recipe']}, world size {results['world_size']}, "
            f"test accuracy {format_accuracy(results['test_accuracy'])}"
        )
    except (ConfigError, KeyError, TypeError):
        parts.append("(no results.json: unfinished)")
    return ": ".join(parts)


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        f"Draw a run's curves per epoch from its metrics.jsonl into a {WIDTH}x{HEIGHT} PNG: train loss, "
        f"test accuracy and samples/s (all ranks together). Needs no display."
    )
    p.epilog = examples(
        "ddp-mnist report runs/latest                 # runs/latest/report.png",
        "ddp-mnist report runs/cnn --out cnn-curves.png",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (reads its metrics.jsonl)")
    p.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help=f"where to write the {WIDTH}x{HEIGHT} PNG (default: RUN_DIR/{REPORT_FILE})",
    )
    p.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir.resolve() / REPORT_FILE
    try:
        draw(run_dir, out)
    except OSError as e:  # e.g. a read-only copy of the run: the default is inside it
        raise ConfigError(f"cannot write {out} ({e.strerror}); pass --out FILE to write the report elsewhere") from None
    print(f"-> {out}", flush=True)
    return 0

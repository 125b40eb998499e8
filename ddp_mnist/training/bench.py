"""`ddp-mnist bench`'s measurements: the tutorial loop as written against the Trainer's fast paths, each
timed in this process (commands/bench.py is the command)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ddp_mnist.config.options import TARGET_ACCURACY, TRAIN_SAMPLES
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.training.profiling import achieved_flops
from ddp_mnist.training.settings import RunSettings

COLUMNS = ("model", "recipe", "variant", "batch", "epochs", "samples/s", "s/epoch", "s to target", "test acc")


@dataclass(frozen=True)
class Variant:
    label: str
    data_path: str  # "tutorial" for the tutorial's own loop
    cuda_graph: str = "off"
    ddp: bool = False

    @property
    def slow(self) -> bool:
        return self.data_path in ("tutorial", "loader")


TUTORIAL = Variant("tutorial loop (as written)", "tutorial")


def trainer_variants(captured: bool) -> list[Variant]:
    """The trainer's variants; the DDP one uses the fastest step this device has."""
    fastest = "captured" if captured else "eager"
    return [
        Variant("loader, eager", "loader"),
        Variant("resident, eager", "resident"),
        Variant("resident, captured", "resident", cuda_graph="on"),
        Variant(f"resident, {fastest}, DDP ws=1", "resident", cuda_graph="on" if captured else "off", ddp=True),
    ]


@dataclass
class Row:
    model: str
    recipe: str
    variant: str
    batch: int | None = None
    epochs: float | None = None
    samples_per_second: float | None = None
    epoch_seconds: float | None = None
    seconds_to_target: float | None = None
    target_accuracy: float | None = None
    test_accuracy: float | None = None
    capture_seconds: float | None = None
    note: str = ""
    flops_per_sample: float | None = None  # forward + backward (profiling.py)
    achieved_tflops: float | None = None
    mfu: float | None = None  # achieved / the device's peak, when known

    def cells(self) -> list[str]:
        if self.samples_per_second is None:
            return [self.model, self.recipe, self.variant, "", "", "n/a", "n/a", "n/a", "n/a"]
        if self.seconds_to_target is not None:
            to_target = f"{self.seconds_to_target:.3g}"
        else:
            to_target = f"not reached ({self.target_accuracy:g}%)"
        return [
            self.model,
            self.recipe,
            self.variant,
            str(self.batch),
            f"{self.epochs:.3g}",
            f"{self.samples_per_second:,.0f}",
            f"{self.epoch_seconds:.3g}",
            to_target,
            f"{self.test_accuracy:.2f}%",
        ]


@dataclass
class Settings:
    models: list[str]
    recipes: list[str]
    epochs: int | None
    slow_epochs: int
    max_steps: int | None
    warmup_steps: int
    repeat: int
    data_dir: str | None
    seed: int
    target_accuracy: float | None


@dataclass
class Report:
    device: str
    torch_version: str
    settings: Settings
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        best = f"; fastest of {self.settings.repeat} timed runs" if self.settings.repeat > 1 else ""
        lines = [
            f"Device: {self.device}; torch {self.torch_version}; every variant in one process, "
            f"after a warm-up run{best}; times exclude evaluation and capture.",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + " --- |" * len(COLUMNS),
        ]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        targets = ", ".join(f"{t:g}% ({m})" for m, t in dict.fromkeys((r.model, r.target_accuracy) for r in self.rows))
        return (
            "\n".join(
                lines
                + [
                    "",
                    f"s to target: training seconds until the test accuracy, checked after each "
                    f"epoch, first reached {targets}.",
                ]
                + self.notes
            )
            + "\n"
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "device": self.device,
                "torch_version": self.torch_version,
                "settings": dataclasses.asdict(self.settings),
                "rows": [dataclasses.asdict(r) for r in self.rows],
                "notes": self.notes,
            },
            indent=2,
        )


# ---------------------------------------------------------------------------------------------- running
def run_bench(settings: Settings, device: torch.device, on_row: Callable[[Report], None] | None = None) -> Report:
    """Every variant, timed; `on_row(report)` after each row (the rows so far, in table order, and a note)."""
    report = Report(device=describe_device(device), torch_version=torch.__version__, settings=settings)
    can_capture = (
        RunSettings.here(TrainConfig(data_path="resident", cuda_graph="on").resolved(), device).capture_blocker is None
    )
    jobs: list[tuple[str, str, Variant]] = []
    for model in settings.models:
        jobs.append((model, "tutorial", TUTORIAL))
        jobs += [(model, recipe, v) for recipe in settings.recipes for v in trainer_variants(can_capture)]
    rows: dict[int, Row] = {}

    def done(i: int, row: Row) -> None:
        rows[i] = row
        report.rows = [rows[j] for j in sorted(rows)]
        report.notes = summary_notes(report.rows, device)
        if len(rows) < len(jobs):
            report.notes.append(f"partial: {len(rows)} of {len(jobs)} variants measured so far")
        if on_row is not None:
            on_row(report)

    # Runs without a process group first; then one 1-rank group for all the DDP rows.
    for i, (model, recipe, variant) in enumerate(jobs):
        if not variant.ddp:
            done(i, run_job(model, recipe, variant, settings, device))
    if any(v.ddp for _, _, v in jobs):
        with one_rank_group(device):
            for i, (model, recipe, variant) in enumerate(jobs):
                if variant.ddp:
                    done(i, run_job(model, recipe, variant, settings, device))
    return report


def run_job(model: str, recipe: str, variant: Variant, settings: Settings, device: torch.device) -> Row:
    target = settings.target_accuracy or TARGET_ACCURACY[model]
    if variant.data_path == "tutorial":
        progress(f"{model} / {variant.label}")
        return time_tutorial(model, settings, device, target)
    cfg = trainer_config(model, recipe, variant, settings, device, target)
    why_not = RunSettings.here(cfg.resolved(), device).capture_blocker if variant.cuda_graph == "on" else None
    if why_not is not None:
        return Row(model, recipe, variant.label, target_accuracy=target, note=f"n/a: {why_not}")
    progress(f"{model} / {recipe} / {variant.label}")
    return time_trainer(cfg, variant, settings, device)


def time_tutorial(model: str, settings: Settings, device: torch.device, target: float) -> Row:
    from ddp_mnist.training.tutorial import BATCH_SIZE, run_tutorial

    if settings.warmup_steps:
        run_tutorial(
            settings.data_dir,
            device,
            model,
            epochs=1,
            max_steps=settings.warmup_steps,
            seed=settings.seed,
            evaluate_each_epoch=False,
        )
    r = max(
        (
            run_tutorial(
                settings.data_dir,
                device,
                model,
                epochs=settings.slow_epochs,
                max_steps=settings.max_steps,
                target_accuracy=target,
                seed=settings.seed,
            )
            for _ in range(settings.repeat)
        ),
        key=lambda run: run.samples_per_second,
    )
    epochs = r.steps * BATCH_SIZE / TRAIN_SAMPLES
    return Row(
        model,
        "tutorial",
        TUTORIAL.label,
        batch=BATCH_SIZE,
        epochs=epochs,
        samples_per_second=r.samples_per_second,
        epoch_seconds=TRAIN_SAMPLES / r.samples_per_second,
        seconds_to_target=r.time_to_target,
        target_accuracy=target,
        test_accuracy=r.test_accuracy[-1],
    )


def trainer_config(
    model: str, recipe: str, variant: Variant, settings: Settings, device: torch.device, target: float
) -> TrainConfig:
    return TrainConfig(
        model=model,
        recipe=recipe,
        epochs=settings.slow_epochs if variant.slow else settings.epochs,
        data_path=variant.data_path,
        cuda_graph=variant.cuda_graph,
        data_dir=settings.data_dir,
        seed=settings.seed,
        target_accuracy=target,
        progress=False,
        max_steps=settings.max_steps,
        keep_checkpoints=1,
        device=device.type,
    )


def time_trainer(cfg: TrainConfig, variant: Variant, settings: Settings, device: torch.device) -> Row:
    if settings.warmup_steps:
        train_in_process(dataclasses.replace(cfg, max_steps=settings.warmup_steps), device)
    r = max((train_in_process(cfg, device) for _ in range(settings.repeat)), key=lambda run: run["samples_per_second"])
    note = "" if r["captured_step"] or variant.cuda_graph == "off" else "capture failed: ran eagerly"
    return Row(
        cfg.model,
        cfg.recipe,
        variant.label,
        batch=r["batch_size"],
        epochs=r["steps"] * r["batch_size"] / TRAIN_SAMPLES,
        samples_per_second=r["samples_per_second"],
        epoch_seconds=r["train_seconds"] * (TRAIN_SAMPLES // r["batch_size"]) / r["steps"],
        seconds_to_target=r["time_to_target_seconds"],
        target_accuracy=cfg.target_accuracy,
        test_accuracy=r["test_accuracy"],
        capture_seconds=r["capture_seconds"],
        note=note,
        **hardware_use(r),
    )


def hardware_use(results: dict[str, Any]) -> dict[str, float | None]:
    """FLOPs per sample from results.json, and the FLOP/s and MFU of this timed run's throughput."""
    use = achieved_flops(results.get("flops_per_sample"), results["samples_per_second"], 1, results.get("peak_tflops"))
    return {key: use[key] for key in ("flops_per_sample", "achieved_tflops", "mfu")}


def train_in_process(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """One training job in this process, in a throw-away run folder; returns its results.json."""
    from ddp_mnist.training.signals import StopSignals
    from ddp_mnist.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="ddp-mnist-bench-") as tmp, StopSignals() as signals:
        cfg = dataclasses.replace(cfg, run_dir=tmp).resolved()
        results = Trainer(cfg, DistEnv(), RunSettings.here(cfg, device), signals).fit()
    gc.collect()  # the trainer (and its CUDA graph's memory pool) goes now, not during the next timed run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


@contextlib.contextmanager
def one_rank_group(device: torch.device) -> Iterator[None]:
    """A 1-rank process group (nccl on CUDA, gloo on the CPU) on a free local port: the trainer wraps its
    model in DDP whenever a group exists."""
    if device.type == "cuda":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # before the group: lets NCCL be captured
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=120),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- reporting
def summary_notes(rows: list[Row], device: torch.device) -> list[str]:
    """Capture time, DDP overhead and speed-ups, one line each."""

    def find(model: str, recipe: str, label: str) -> Row | None:
        return next(
            (r for r in rows if (r.model, r.recipe, r.variant) == (model, recipe, label) and r.samples_per_second), None
        )

    captures = [
        f"{r.model}/{r.recipe}{' (DDP)' if 'DDP' in r.variant else ''} {r.capture_seconds:.2f} s"
        for r in rows
        if r.capture_seconds is not None
    ]
    not_captured = next((r.note for r in rows if r.note.startswith("n/a")), "n/a: no captured run")
    notes = [
        f"CUDA graph capture (11 warm-up steps + capture; not in the times above): "
        f"{', '.join(captures) if captures else not_captured}"
    ]
    ddp, speedups = [], []
    for r in rows:
        if "DDP" in r.variant and r.samples_per_second:
            plain = find(r.model, r.recipe, r.variant.replace(", DDP ws=1", ""))
            if plain:
                ddp.append(f"{r.model}/{r.recipe} {100 * (plain.samples_per_second / r.samples_per_second - 1):+.1f}%")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if ddp:
        notes.append(
            f"DDP overhead (world size 1, {backend}; time per step vs the same step without DDP): " + ", ".join(ddp)
        )
    for model, recipe in dict.fromkeys((r.model, r.recipe) for r in rows if r.variant != TUTORIAL.label):
        loader = find(model, recipe, "loader, eager")
        best = find(model, recipe, "resident, captured") or find(model, recipe, "resident, eager")
        tutorial = find(model, "tutorial", TUTORIAL.label)
        if best and loader:
            line = (
                f"{model}/{recipe}: {best.variant} is {best.samples_per_second / loader.samples_per_second:.1f}x "
                f"the loader path"
            )
            if tutorial:
                line += f" and {best.samples_per_second / tutorial.samples_per_second:.1f}x the tutorial loop"
            speedups.append(line + " (samples/s)")
    notes += speedups
    counted = [r for r in rows if r.achieved_tflops]
    if counted:
        fastest = max(counted, key=lambda r: r.achieved_tflops)
        per_model = ", ".join(
            f"{m} {f / 1e6:.2f} M" for m, f in dict.fromkeys((r.model, r.flops_per_sample) for r in counted)
        )
        mfu = f"MFU {100 * fastest.mfu:.2f}%" if fastest.mfu else "no MFU: no known peak (--peak-tflops in train)"
        notes.append(
            f"FLOPs per sample (forward + backward, FlopCounterMode): {per_model}; fastest: "
            f"{fastest.model}/{fastest.recipe} {fastest.variant} {fastest.achieved_tflops:.3f} TFLOP/s ({mfu})"
        )
    notes += [f"{r.model}/{r.recipe}/{r.variant}: {r.note}" for r in rows if r.note and r.samples_per_second]
    return notes


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.machine()
    with contextlib.suppress(OSError):
        name = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), name
        )
    return f"CPU {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def progress(message: str) -> None:
    print(f"bench: {message} ...", file=sys.stderr, flush=True)

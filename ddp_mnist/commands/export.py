"""`ddp-mnist export RUN_DIR`: a run's weights as `model.safetensors` plus `model.json` (its settings).

safetensors holds tensors only (no pickled code to trust, loadable without torch.load); the JSON says what
the weights need to be used as trained: network, input scaling, input shape, classes, and where they came
from. `ddp-mnist predict` and `evaluate` read the pair (trained.py owns the format).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ddp_mnist.artifacts.trained import EXPORT_WEIGHTS, load_trained, write_export
from ddp_mnist.commands.arguments import examples
from ddp_mnist.errors import ConfigError
from ddp_mnist.training.evaluation import format_accuracy


def export_run(source: str | Path, best: bool = False, out: str | Path | None = None) -> tuple[Path, Path]:
    """Export a run folder's newest good checkpoint (or its best.pt, or a given checkpoint) into the run
    folder or `out`. Returns the paths of the weights and the JSON."""
    trained = load_trained(source, "cpu", best=best)
    folder = Path(out) if out is not None else trained.run_dir or trained.path.parent
    try:
        return write_export(trained, folder)
    except OSError as e:
        raise ConfigError(f"cannot write the export into {folder} ({e.strerror}); choose another --out DIR") from None


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        f"Write a run's weights as {EXPORT_WEIGHTS} (tensors only: nothing to unpickle) and "
        f"model.json beside it (network, input scaling, input shape, classes, source checkpoint, "
        f"step, test accuracy, ddp-mnist version), for `ddp-mnist predict` or any safetensors reader."
    )
    p.epilog = examples(
        "ddp-mnist export runs/latest                 # runs/latest/model.safetensors + model.json",
        "ddp-mnist export runs/latest --best --out models/mlp",
        "ddp-mnist predict runs/latest/model.safetensors digit.png",
    )
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run folder (its newest good checkpoint, or best.pt with --best) or a checkpoint (.pt)",
    )
    p.add_argument(
        "--best",
        action="store_true",
        help="export the run's best.pt (the highest test accuracy seen) instead of its newest checkpoint",
    )
    p.add_argument(
        "--out", metavar="DIR", default=None, help=f"folder for {EXPORT_WEIGHTS} and its JSON (default: the run folder)"
    )
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    tensors, meta = export_run(args.run_dir, args.best, args.out)
    settings = load_trained(tensors).settings  # read back: what predict will see
    accuracy = "not evaluated" if settings.test_accuracy is None else format_accuracy(settings.test_accuracy)
    print(
        f"exported {settings.source_checkpoint} (step {settings.global_step}, test accuracy {accuracy}) "
        f"-> {tensors}, {meta}",
        flush=True,
    )
    return 0

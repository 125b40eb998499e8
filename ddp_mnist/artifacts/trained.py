"""A trained model, wherever it was saved: the one loader behind `evaluate`, `export` and `predict`.

A model comes from
- a checkpoint (`step-*.pt` or `best.pt`): its `model` entry is the unwrapped state_dict, its `config`
  says which network it is and how its inputs were scaled (docs/design.md, Checkpoint contents);
- a run folder: its newest good checkpoint, chosen as `--resume` chooses it (or `best.pt`, with `best`);
- an export: `model.safetensors` (weights only: no pickle to trust) beside `model.json` (ModelSettings).
The export's two files are written and read here, so the format has one owner.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddp_mnist import __version__
from ddp_mnist.artifacts.checkpoint import Checkpointer, load
from ddp_mnist.artifacts.config_sources import read_run_config
from ddp_mnist.artifacts.run_dir import CHECKPOINTS, RunDir
from ddp_mnist.config.options import MODELS, NORMALIZATIONS
from ddp_mnist.data.batches import to_input
from ddp_mnist.errors import CheckpointError, first_line
from ddp_mnist.files import atomic_write, write_json_atomic
from ddp_mnist.model import INPUT_SHAPE, build_model
from ddp_mnist.parallel.collectives import is_main_rank

EXPORT_WEIGHTS = "model.safetensors"


CLASSES = list(range(10))  # output i is digit i


@dataclass
class ModelSettings:
    """What a model needs besides its weights to be used as it was trained; `model.json` of an export."""

    model: str
    """The network, as `--model` names it (`mlp`, `cnn`)."""
    normalize: str
    """How pixels were scaled in training (`--normalize`): inputs must be scaled the same way."""
    precision: str
    """The training precision (`--precision`), so `evaluate` can score the weights as training did."""
    source_checkpoint: str
    """The checkpoint the weights were read from."""
    global_step: int | None
    """The optimizer step at which they were saved."""
    test_accuracy: float | None
    """Their test accuracy in percent as training measured it (None: not evaluated at that step)."""
    input_shape: list[int] = field(default_factory=lambda: list(INPUT_SHAPE))
    classes: list[int] = field(default_factory=lambda: list(CLASSES))
    ddp_mnist_version: str = __version__

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], path: Path) -> ModelSettings:
        config = state["config"]
        # Training's accuracy belongs to these weights only when it was measured at the step they were saved.
        scored = state.get("last_test_step") == state.get("global_step")
        accuracy = (state.get("last_test") or {}).get("test_accuracy") if scored else None
        return cls(
            model=config["model"],
            normalize=config["normalize"],
            precision=config["precision"],
            source_checkpoint=str(path),
            global_step=state.get("global_step"),
            test_accuracy=accuracy,
        )

    @classmethod
    def read(cls, path: Path) -> ModelSettings:
        """An export's JSON; keys added by later versions are ignored (add keys, never rename them)."""
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(
                f"{path} is missing: an exported model is read with the JSON that `ddp-mnist export` writes beside it"
            ) from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path} cannot be read as JSON ({e})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            settings = cls(**{k: v for k, v in values.items() if k in known})
        except (AttributeError, TypeError) as e:  # not an object, or a required key missing
            raise CheckpointError(f"{path} is not the JSON of a ddp-mnist export ({e})") from None
        problems = [
            f"{name} {value!r}"
            for name, value, ok in (
                ("model", settings.model, settings.model in MODELS),
                ("normalize", settings.normalize, settings.normalize in NORMALIZATIONS),
                ("input_shape", settings.input_shape, settings.input_shape == list(INPUT_SHAPE)),
                ("classes", settings.classes, settings.classes == CLASSES),
            )
            if not ok
        ]
        if problems:
            raise CheckpointError(f"{path} describes a model this ddp-mnist cannot run: {', '.join(problems)}")
        return settings


@dataclass
class TrainedModel:
    """Weights in their network (in eval mode), how to feed it, and where they came from."""

    model: nn.Module
    settings: ModelSettings
    path: Path
    """The file the weights were read from (symlinks resolved)."""
    run_dir: Path | None
    """The run folder they belong to (symlinks resolved), or None for a file outside any run folder."""

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 28, 28] (white digit on black, as in MNIST) -> logits [N, 10], in fp32."""
        device = next(self.model.parameters()).device
        return self.model(to_input(images.to(device), self.settings.normalize)).float()


def load_trained(source: str | Path, device: torch.device | str = "cpu", best: bool = False) -> TrainedModel:
    """The model in a checkpoint, a run folder (its newest good checkpoint; `best`: its best.pt) or an export.
    Under a process group every rank calls it: rank 0 chooses a run folder's checkpoint for all."""
    path = _weights_file(Path(source), best)
    if path.suffix == ".safetensors":
        settings, weights = _read_export(path, device)
    else:
        settings, weights = _read_checkpoint(path, device)
    try:
        model = build_model(settings.model)
        model.load_state_dict(weights)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: the weights do not fit the {settings.model!r} network ({type(e).__name__}: {first_line(e)})"
        ) from None
    return TrainedModel(model.to(device).eval(), settings, path, _run_dir_of(path))


def _weights_file(source: Path, best: bool) -> Path:
    if source.is_file():
        if best:
            raise CheckpointError(f"--best picks a run folder's best.pt; {source} is a file, not a run folder")
        return source.resolve()
    if not source.is_dir():
        raise CheckpointError(f"{source} is neither a checkpoint file nor a run folder")
    run = RunDir(source.resolve())  # runs/latest may be a symlink: record the folder it stands for
    if not run.config.exists():
        raise CheckpointError(f"{source} is not a run folder (no config.json); pass a run folder or a .pt file")
    checkpoints = Checkpointer(
        run.checkpoints, keep=1, is_main=is_main_rank(), read_only=True
    )  # on a read-only copy too
    if best:
        return checkpoints.intact_best()
    path = checkpoints.choose(read_run_config(run.path))
    if path is None:
        raise CheckpointError(f"run folder {source} holds no checkpoint yet")
    return path


def _read_checkpoint(path: Path, device: torch.device | str) -> tuple[ModelSettings, dict[str, torch.Tensor]]:
    try:
        state = load(path, device)
    except Exception as e:  # noqa: BLE001 - whatever the file holds, it is not a checkpoint we can read
        # An unpickling error explains weights_only at length; that the file is no checkpoint says it all.
        why = type(e).__name__ if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {first_line(e)}"
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint ({why}); pass a .pt written by ddp-mnist, "
            f"a run folder, or an exported {EXPORT_WEIGHTS}"
        ) from None
    try:
        return ModelSettings.from_checkpoint(state, path), state["model"]
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a ddp-mnist checkpoint ({type(e).__name__}: {e})") from None


def _read_export(path: Path, device: torch.device | str) -> tuple[ModelSettings, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file  # only exports need it: training never imports it

    settings = ModelSettings.read(path.with_suffix(".json"))
    try:
        return settings, load_file(path, device=str(device))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise CheckpointError(f"{path} cannot be read as safetensors ({type(e).__name__}: {first_line(e)})") from None


def write_export(trained: TrainedModel, folder: Path) -> tuple[Path, Path]:
    """`model.safetensors` and `model.json` in `folder`, each written atomically, the JSON last."""
    from safetensors.torch import save

    weights = {name: t.detach().cpu().contiguous() for name, t in trained.model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = folder / EXPORT_WEIGHTS, (folder / EXPORT_WEIGHTS).with_suffix(".json")
    atomic_write(tensors, lambda f: f.write(save(weights)))
    write_json_atomic(meta, dataclasses.asdict(trained.settings), durable=True)
    return tensors, meta


def _run_dir_of(path: Path) -> Path | None:
    """RUN for RUN/checkpoints/*.pt and for an export written into RUN (a folder with config.json)."""
    folder = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
    return folder if RunDir(folder).config.is_file() else None

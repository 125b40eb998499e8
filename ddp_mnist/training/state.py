"""What a checkpoint holds of the training loop besides its modules: the position and scores
(TrainState), the per-rank random states, and the rule that makes a dataclass's fields checkpoint entries.

Every entry is what `torch.load(weights_only=True)` reads back: tensors, plain containers and primitives.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import torch

ADDED_LATER = {"added_later": True}
"""Field metadata: older checkpoints lack this entry, so loading one gives the field its default."""


NOT_SAVED = {"saved": False}
"""Field metadata: this process's own (settings, clocks), never in a checkpoint."""


class SavedFields:
    """For dataclasses whose fields are top-level checkpoint entries: `state_dict` and `load_state_dict`
    follow `dataclasses.fields`, so a new entry is one field (marked ADDED_LATER: old checkpoints load)."""

    def saved_fields(self) -> list[dataclasses.Field]:
        fields = dataclasses.fields(self)  # type: ignore[arg-type]  # every subclass is a dataclass
        return [f for f in fields if f.metadata.get("saved", True)]

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.saved_fields()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises KeyError for a missing entry that every checkpoint has: the file is not this job's kind."""
        for f in self.saved_fields():
            if f.name in state:
                setattr(self, f.name, state[f.name])
            elif f.metadata.get("added_later"):
                setattr(
                    self, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                )
            else:
                raise KeyError(f.name)


@dataclass
class TrainState(SavedFields):
    """Where the job is and what it scored; saved whole in every checkpoint (its timing and loss totals
    are the Meter's, meter.py)."""

    epoch: int = 0
    step_in_epoch: int = 0  # the position inside the epoch: resume continues the same batches
    global_step: int = 0
    last_test: dict[str, float] = field(default_factory=dict)  # the latest evaluation (evaluation.py)
    last_test_step: int | None = field(default=None, metadata=ADDED_LATER)  # the step whose weights it scored
    best_accuracy: float | None = field(default=None, metadata=ADDED_LATER)  # of those weights: best.pt
    tracker_run_id: str | None = None  # kept even when an attempt runs without --wandb

    def check_position(self, steps_per_epoch: int, epochs: int) -> None:
        """A position this job can be at (a checkpoint whose hash is right can still hold an impossible one, and
        the loop would then never reach its end): ValueError naming it."""
        where = (self.epoch, self.step_in_epoch, self.global_step)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in where) or not (
            0 <= self.epoch <= epochs
            and 0 <= self.step_in_epoch < steps_per_epoch
            and self.global_step == self.epoch * steps_per_epoch + self.step_in_epoch
        ):
            raise ValueError(
                f"impossible position: epoch {self.epoch!r}, step {self.step_in_epoch!r} in the epoch, global "
                f"step {self.global_step!r} (this job has {epochs} epochs of {steps_per_epoch} steps)"
            )

    @property
    def scored(self) -> bool:
        """Whether last_test measured the weights at this step."""
        return self.last_test_step == self.global_step

    def record_best(self) -> bool:
        """Whether the weights at this step were evaluated and beat the best accuracy so far (now theirs)."""
        best = self.scored and (self.best_accuracy is None or self.last_test["test_accuracy"] > self.best_accuracy)
        if best:
            self.best_accuracy = self.last_test["test_accuracy"]
        return best


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())

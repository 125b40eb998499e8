"""TensorBoard on rank 0 (`--tensorboard`): `RUN/tensorboard/`, the same scalars as W&B (each epoch's row and
each logged step's), the resolved config and the results as text. Beside W&B or alone; for sites that cannot
reach W&B. Like W&B it never breaks training: an error is one warning, and this tracker stops.
`tensorboard` (the package torch.utils.tensorboard writes with) is imported only when --tensorboard is given.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from ddp_mnist.errors import ConfigError

log = logging.getLogger("ddp_mnist")

FOLDER = "tensorboard"
MISSING = "--tensorboard needs the tensorboard package: `pip install tensorboard` (or 'ddp-mnist[tensorboard]')"
STEP_KEYS = ("train/global_step", "epoch/global_step")  # the x axis: the global step of what is logged


class TensorBoardTracker:
    """Writes RUN/tensorboard/; a resumed job purges the events after its checkpoint's step (they are redone)."""

    run_id: str | None = None  # the W&B run's id is the job's; TensorBoard has none

    def __init__(self, run: Path, config: dict[str, Any], start_step: int, resuming: bool) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(f"{MISSING} ({type(e).__name__}: {e})") from None
        # A resumed job logs again what came after its checkpoint's step: an earlier attempt's events there go.
        purge = start_step + 1 if resuming else None
        try:
            self.writer: Any = SummaryWriter(log_dir=str(run / FOLDER), purge_step=purge)
        except Exception as e:  # noqa: BLE001 - a full disk, a read-only folder: tracking never stops training
            log.warning(
                "TensorBoard: %s cannot be written (%s: %s); no TensorBoard for this job", run, type(e).__name__, e
            )
            self.writer = None
        self._text("config", config, start_step)

    def log(self, metrics: dict[str, Any]) -> None:
        step = next((metrics[k] for k in STEP_KEYS if k in metrics), None)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._call("add_scalar", key, value, step)

    def summary(self, values: dict[str, Any]) -> None:
        self._text("results", values, values.get("steps"))

    def finish(self, exit_code: int = 0, preempting: bool = False) -> None:
        self._call("close")

    def _text(self, tag: str, values: dict[str, Any], step: int | None) -> None:
        text = json.dumps(values, indent=2, sort_keys=True, default=str)
        self._call("add_text", tag, "    " + text.replace("\n", "\n    "), step)  # indented: shown as code

    def _call(self, method: str, *args: Any) -> None:
        if self.writer is None:
            return
        try:
            getattr(self.writer, method)(*args)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            log.warning(
                "TensorBoard: %s failed (%s: %s); TensorBoard logging stops for this job", method, type(e).__name__, e
            )
            self.writer = None


def check_tensorboard() -> None:
    """Every rank, before any work: --tensorboard needs the package (the same error on every rank)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(MISSING)

"""Crash-safe checkpoints: written atomically by rank 0, verified on resume, the last K intact ones kept.

Each checkpoint is a pair in `RUN/checkpoints/`: `step-XXXXXXXX.pt` (torch.save of the whole state)
and `step-XXXXXXXX.json` (its SHA-256 and position), the JSON written last. A `.pt` without its JSON,
or whose hash differs, was cut short or damaged: resume skips it with a warning and takes the one before,
and a damaged pair is moved to `RUN/checkpoints/damaged/` (kept for inspection, never counted or resumed).
`best.pt` (beside `best.json`) holds the weights with the best test accuracy so far; it is not a `step-*`
file, so it never counts towards `--keep-checkpoints` and is never resumed from.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from ddp_mnist.config.validation import trajectory_changes
from ddp_mnist.errors import CheckpointError
from ddp_mnist.files import atomic_write, copy_atomic, file_digest, write_text_atomic
from ddp_mnist.parallel.collectives import barrier, broadcast_from_main
from ddp_mnist.parallel.faults import fault_point

log = logging.getLogger("ddp_mnist")


class Checkpointer:
    """The run's checkpoints folder. Only complete, intact `step-*` pairs count towards `keep` and are
    resumed from; damaged ones are set aside in `damaged/` (kept for inspection); `best.pt` is apart."""

    def __init__(self, folder: Path, keep: int, is_main: bool, every: int = 0, read_only: bool = False):
        self.folder = folder
        self.keep = keep
        self.is_main = is_main
        self.read_only = read_only  # a command that only reads the run (evaluate, export, predict): moves nothing
        self.every = every  # --checkpoint-every: steps between checkpoints inside an epoch (0: per epoch only)
        self.longest_save_s = 0.0  # the longest save of this process so far (time_limit.py plans with it)

    def should_save(self, step: int, ends_epoch: bool, ends_run: bool) -> bool:
        """Whether optimizer step `step` is saved inside the loop (every `every` steps). The last step of an epoch
        or of the run is saved by the epoch's end or the run's finish instead: saving a step twice would replace
        its good checkpoint, and a crash in between could leave none."""
        return bool(self.every) and step % self.every == 0 and not ends_epoch and not ends_run

    @property
    def damaged_folder(self) -> Path:
        return self.folder / "damaged"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    # ------------------------------------------------------------------ saving
    def save(self, state: dict[str, Any], step: int, best: bool = False) -> Path:
        """Rank 0 writes; every rank waits until the checkpoint is complete on disk. `best`: these weights
        scored the best test accuracy so far: also keep them as best.pt."""
        path, started = self.folder / f"step-{step:08d}.pt", time.monotonic()
        if self.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            data = serialized(state)  # in memory first: a full disk is then ENOSPC, not torch's "enforce fail"
            atomic_write(path, lambda f: f.write(data), before_rename=lambda: fault_point("save-pt", step, 0))
            fault_point("save-json", step, 0)
            meta = {
                "file": path.name,
                "sha256": file_digest(path, "sha256"),
                "global_step": step,
                "epoch": state["epoch"],
                "step_in_epoch": state["step_in_epoch"],
            }
            write_text_atomic(path.with_suffix(".json"), json.dumps(meta), durable=True)
            if best:
                self._save_best(path, meta, state.get("last_test", {}))
            self._prune(fresh=path)
        barrier()
        self.longest_save_s = max(self.longest_save_s, time.monotonic() - started)
        return path

    def _save_best(self, path: Path, meta: dict[str, Any], test: dict[str, Any]) -> None:
        with open(path, "rb") as src:
            copy_atomic(src, self.best, durable=True)
        best_meta = {**meta, "file": self.best.name, "copied_from": path.name, **test}
        write_text_atomic(self.best.with_suffix(".json"), json.dumps(best_meta), durable=True)

    def _prune(self, fresh: Path) -> None:
        """Keep the newest `keep` intact checkpoints. Older ones go; damaged ones are set aside and never
        count; what killed writers left behind (a .pt without its JSON, temporary files) is deleted.
        `fresh`: the checkpoint just written, whose hash was computed from these bytes a moment ago."""
        intact = 0
        for pt in step_files(self.folder):
            meta = pt.with_suffix(".json")
            if not meta.exists():  # cut short before its JSON: never usable
                pt.unlink(missing_ok=True)
                continue
            problem = None if pt == fresh else _damage(pt)
            if problem:
                self._set_aside(pt, problem)
            elif intact < self.keep:
                intact += 1
            else:
                meta.unlink(missing_ok=True)  # the JSON first: a half-pruned pair reads as incomplete
                pt.unlink(missing_ok=True)
        for meta in step_files(self.folder, ".json"):  # a JSON whose .pt is gone (pruned or set aside by hand)
            if not meta.with_suffix(".pt").exists():
                meta.unlink(missing_ok=True)
        for tmp in self.folder.iterdir():  # temporary files of a killed writer of ours (files._temporary's names)
            if OUR_TEMPORARY.fullmatch(tmp.name):
                tmp.unlink(missing_ok=True)

    def _set_aside(self, pt: Path, problem: str) -> None:
        """Move a damaged checkpoint (and its JSON) into damaged/, where nothing counts or resumes it."""
        self.damaged_folder.mkdir(exist_ok=True)
        for path in (pt, pt.with_suffix(".json")):
            if path.exists():
                os.replace(path, self.damaged_folder / path.name)
        log.warning("checkpoint %s is damaged (%s): moved to %s", pt, problem, self.damaged_folder)

    # ------------------------------------------------------------------ choosing and loading
    def intact_best(self) -> Path:
        """best.pt, checked against the hash in best.json (for `export --best`; resume never reads it)."""
        if not self.best.exists():
            raise CheckpointError(
                f"{self.folder} holds no best.pt (it is written when a test evaluation "
                f"beats the best accuracy so far); pass the run folder without --best"
            )
        problem = _damage(self.best)
        if problem:
            raise CheckpointError(f"{self.best} is not usable: {problem}")
        return self.best

    def choose(self, config: dict[str, Any]) -> Path | None:
        """Rank 0 picks the newest good checkpoint and every rank gets the same answer (or error)."""
        choice: tuple[str | None, str | None] = (None, None)
        if self.is_main:
            try:
                found = self._newest_good(config)
                choice = (str(found) if found else None, None)
            except (CheckpointError, OSError) as e:  # every rank must get the answer, errors included
                choice = (None, str(e))
        path, error = broadcast_from_main(choice)
        if error:
            raise CheckpointError(error)
        return Path(path) if path else None

    def restore(self, config: dict[str, Any], device: torch.device, load_state_dict) -> Path | None:
        """Resume: the checkpoint `choose` picks, loaded into `load_state_dict` (the trainer's); a checkpoint that
        does not fit this job is a CheckpointError naming it. Returns its path, or None when there is none."""
        path = self.choose(config)
        if path is not None:
            try:
                load_state_dict(load(path, device))
            except (KeyError, RuntimeError, ValueError, TypeError) as e:
                raise CheckpointError(
                    f"checkpoint {path} does not fit this job ({type(e).__name__}: {e}); "
                    f"use a new --run-dir to start another job"
                ) from None
        return path

    def _newest_good(self, config: dict[str, Any]) -> Path | None:
        bad: list[tuple[Path, str]] = []
        check_folder(self.folder)
        for pt in step_files(self.folder) if self.folder.exists() else []:
            problem = self._problem(pt, config)
            if problem is None:
                if bad:
                    log.warning("resuming from %s, the newest good checkpoint", pt)
                for damaged, why in bad if not self.read_only else []:  # a damaged one never survives a good one
                    if damaged.with_suffix(".json").exists():  # (one without JSON is a cut write: pruned)
                        self._set_aside(damaged, why)
                return pt
            log.warning("skipping checkpoint %s: %s", pt, problem)
            bad.append((pt, problem))
        if bad:  # nothing good: leave every file where it is, for the user to decide
            raise CheckpointError(
                f"no usable checkpoint in {self.folder}: "
                + "; ".join(f"{pt.name} ({why})" for pt, why in bad)
                + ". Delete the folder to start over, or restore a good checkpoint."
            )
        return None

    def _problem(self, pt: Path, config: dict[str, Any]) -> str | None:
        problem = _damage(pt)
        if problem:
            return problem
        try:
            state = load(pt)
        except Exception as e:  # noqa: BLE001 - any failure to read means: not usable
            return f"cannot be loaded ({type(e).__name__}: {e})"
        if not isinstance(state, dict) or not isinstance(state.get("config", {}), dict):
            return "not a ddp-mnist checkpoint (no dict of entries with its config)"
        check_compatible(state.get("config", {}), config, pt)  # raises: a wrong job is an error, not a fallback
        return None


STEP_FILE = re.compile(r"step-(\d{8,})\.(pt|json)")
"""The names this package writes for a step's checkpoint (8 digits, more past step 99,999,999): pruning and
choosing touch these names only, never a file of the user's that merely starts with `step-`."""
OUR_TEMPORARY = re.compile(r"\.(step-\d{8,}\.(pt|json)|best\.(pt|json))\..+\.tmp")


def step_files(folder: Path, suffix: str = ".pt") -> list[Path]:
    """The step checkpoints in `folder` with this suffix, newest step first (by number: step-100000000 is newer
    than step-99999999, whatever their names' order)."""
    found = [(int(m.group(1)), p) for p in folder.glob(f"step-*{suffix}") if (m := STEP_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def check_folder(folder: Path) -> None:
    """A checkpoints folder that is there is a folder this process can list and write: otherwise its checkpoints
    would look absent, and a resume would start the job over (and fail at its first save)."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; move it away (it is not ddp-mnist's) and resume again")
    if folder.is_symlink():
        raise CheckpointError(
            f"{folder} is a link (to {os.readlink(folder)}): checkpoints are written only inside the run folder; "
            f"replace the link by a folder"
        )
    if folder.is_dir() and not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        raise CheckpointError(f"{folder} cannot be read and written by this user; fix its permissions and resume")


def _damage(pt: Path) -> str | None:
    """What is wrong with a checkpoint's files (missing or unreadable JSON, a hash that differs), or None."""
    meta_path = pt.with_suffix(".json")
    if not meta_path.exists():
        return "incomplete (no .json beside it: the write was cut short)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # not UTF-8, not JSON: ValueErrors
        return f"unreadable metadata ({e})"
    if not isinstance(meta, dict):
        return f"unreadable metadata (a JSON {type(meta).__name__}, not an object)"
    try:
        if file_digest(pt, "sha256") != meta.get("sha256"):
            return "corrupt or truncated (SHA-256 differs from the one recorded when it was written)"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return None


def serialized(state: dict[str, Any]) -> bytes:
    """torch.save's bytes (MNIST's models and their optimizer state are megabytes)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    # weights_only=True: a checkpoint is data, never code.
    return torch.load(path, map_location=device, weights_only=True)


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    diffs = trajectory_changes(saved, current, "the checkpoint")
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different training job ({'; '.join(diffs)}). Use the same "
            f"options to resume it, or a new --run-dir to start another job."
        )

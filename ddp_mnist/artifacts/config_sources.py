"""Where a training job's settings come from, lowest first: the recipe, the resumed run's config.json,
`--config FILE`, the flags given on the command line.

Only flags the user GAVE count (argparse defaults are None): a flag left out never hides a value from a
lower source. A config file (TOML or JSON) holds TrainConfig keys, as in config.json (`batch_size`; the
flag's spelling `batch-size` works too). A run's config.json is itself a valid `--config`: the keys that
name one launch or one folder (LAUNCH_KEYS) are not read from files.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from ddp_mnist.artifacts.run_dir import CHECKPOINTS, LATEST, RunDir
from ddp_mnist.config.options import current_keys
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.config.validation import trajectory_changes
from ddp_mnist.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Not read from config.json or --config: where this launch writes (run_dir) and whether it resumes belong
# to the command line; the test-only pause and the launcher's process count describe one launch, not the
# run (a run may resume at another world size).
LAUNCH_KEYS = ("run_dir", "resume", "pause_at_step", "expected_world_size")


def compose_config(given: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """The job's config from the flags `given` (only those the user gave; `resume` may be True or a RUN path)
    and `--config FILE`. Resuming reads the run's config.json, and refuses flags that change its trajectory."""
    file_values = read_config_file(Path(config_file)) if config_file else {}
    given = dict(given)
    run_values: dict[str, Any] = {}
    if given.get("resume"):
        folder = resumed_folder(given["resume"], given.get("run_dir"))
        given.update(run_dir=str(folder), resume=True)
        run_values = read_run_config(folder)
    cfg = TrainConfig(**{**run_values, **file_values, **given})
    if run_values:
        check_resume(TrainConfig(**run_values), cfg, Path(given["run_dir"]))
    return cfg


def resumed_folder(resume: bool | str, run_dir: str | None) -> Path:
    """The run folder `--resume [RUN]` names: RUN (a run folder, or a checkpoint in one), else --run-dir, else
    runs/latest. A link (runs/latest) is followed once, here: a run started meanwhile does not move this one."""
    if resume is True and run_dir is not None:
        return Path(run_dir)  # as before: it may not exist yet (the job then starts from the beginning)
    if resume is True and not os.path.lexists(LATEST):
        raise ConfigError(
            f"--resume: there is no {LATEST} (no run was started here without --run-dir); "
            f"name the run: --resume RUN_DIR"
        )
    path = LATEST if resume is True else Path(str(resume))
    folder = path.parent.parent if path.is_file() and path.parent.name == CHECKPOINTS else path
    if folder.is_symlink():
        folder = folder.parent / os.readlink(folder)
    if not RunDir(folder).config.is_file():
        raise ConfigError(
            f"--resume {path}: not a run folder (no config.json in {folder}); name a run folder "
            f"or a checkpoint in its checkpoints/"
        )
    if run_dir is not None and Path(run_dir).resolve() != folder.resolve():
        raise ConfigError(f"--resume {resume} and --run-dir {run_dir} name different runs; give one of them")
    return folder


def read_run_config(folder: Path) -> dict[str, Any]:
    """The settings in a run folder's config.json ({} when it has none: a job that never started)."""
    path = RunDir(folder).config
    return read_settings(path) if path.is_file() else {}


def read_config_file(path: Path) -> dict[str, Any]:
    """`--config FILE`: TOML (.toml) or JSON (.json)."""
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"--config {path}: name a .toml or a .json file")
    return read_settings(path)


def read_settings(path: Path) -> dict[str, Any]:
    """A TOML or JSON file's TrainConfig keys (dashes read as underscores), checked; LAUNCH_KEYS left out."""
    try:
        text = path.read_bytes().decode()
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError both are ValueErrors
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a table of settings") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {path} must hold a table of settings (key = value), not a {type(values).__name__}"
        )
    settings = current_keys({str(key).replace("-", "_"): value for key, value in values.items()})
    check_settings(settings, str(path))
    return {key: value for key, value in settings.items() if key not in LAUNCH_KEYS}


def check_settings(settings: dict[str, Any], source: str) -> None:
    """Every key is a TrainConfig field and every value has its type; errors name the closest valid key."""
    hints = typing.get_type_hints(TrainConfig)
    unknown = [key for key in settings if key not in hints]
    if unknown:
        hints_text = "; ".join(
            f"{key!r}" + "".join(f" (did you mean {m!r}?)" for m in difflib.get_close_matches(key, list(hints), n=1))
            for key in unknown
        )
        raise ConfigError(f"{source}: unknown setting(s) {hints_text}; `ddp-mnist train --help` lists them")
    for key, value in settings.items():
        if not _fits(value, hints[key]):
            raise ConfigError(f"{source}: {key} = {value!r} is not a {_type_name(hints[key])}")


def _kinds(hint: Any) -> tuple[Any, ...]:
    """`int | None` -> (int, NoneType); `int` -> (int,)."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _fits(value: Any, hint: Any) -> bool:
    kinds = _kinds(hint)
    for kind in kinds:
        if kind is type(None) and value is None:
            return True
        if typing.get_origin(kind) is list:
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return True
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif isinstance(kind, type) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return True
    return False


def _type_name(hint: Any) -> str:
    return " or ".join(
        "list of strings" if typing.get_origin(k) is list else k.__name__ for k in _kinds(hint) if k is not type(None)
    )


def check_resume(run: TrainConfig, now: TrainConfig, folder: Path) -> None:
    """The flags and --config may change anything but the trajectory (config.trajectory_changes)."""
    changes = trajectory_changes(run.resolved().to_dict(), now.resolved().to_dict(), "the run")
    if changes:
        raise ConfigError(
            f"--resume {folder}: these settings would change the run's training: {'; '.join(changes)}. "
            f"Leave them out to continue the run, or start a new run with them."
        )

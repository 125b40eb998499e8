"""ddp-mnist never deletes, overwrites or writes out of the run folder anything it did not write itself (issue
"Nothing of the user's lost", rule 2). No process is started."""

from __future__ import annotations

import json

import pytest
import torch

from ddp_mnist.artifacts.checkpoint import Checkpointer, step_files
from ddp_mnist.artifacts.run_dir import RunDir
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.errors import CheckpointError, ConfigError


def state(step: int) -> dict:
    return {"epoch": 0, "step_in_epoch": step, "config": {}, "model": {"w": torch.full((2,), float(step))}}


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_start_refuses_run_files_it_did_not_write(tmp_path):
    """The reported case: `--run-dir .` in a folder holding the user's own config.json and metrics.jsonl
    overwrote the one and deleted the other."""
    run = RunDir(tmp_path)
    run.config.write_text('{"learning_rate": 3e-4, "layers": [64, 64]}\n')  # the user's own experiment
    run.metrics.write_text("loss=0.3\nloss=0.2\n")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"holds config\.json and metrics\.jsonl, which ddp-mnist did not write"):
        run.prepare(TrainConfig().resolved(), resuming=False)
    assert snapshot(tmp_path) == before


def test_a_fresh_start_after_a_start_that_saved_nothing_goes_on(tmp_path):
    run = RunDir(tmp_path)
    TrainConfig(lr=0.5).resolved().save(run.config)  # ours: an earlier start that ended before its checkpoint
    run.prepare(TrainConfig().resolved(), resuming=False)
    assert json.loads(run.config.read_text())["lr"] == TrainConfig().resolved().lr


def test_other_files_in_the_folder_and_in_checkpoints_are_left_alone(tmp_path):
    run = RunDir(tmp_path)
    run.checkpoints.mkdir()
    mine = {
        "notes.md": b"my notes",
        "checkpoints/step-final.pt": b"not ours",
        "checkpoints/step-1.pt": b"nor this",
        "checkpoints/.draft.tmp": b"a temporary file of the user's",
        "checkpoints/step-00000001.txt": b"x",
    }
    for name, content in mine.items():
        (tmp_path / name).write_bytes(content)
    assert not run.has_checkpoint()
    run.prepare(TrainConfig().resolved(), resuming=False)  # a fresh start: none of these is a run file
    writer = Checkpointer(run.checkpoints, keep=1, is_main=True)
    for step in (1, 2, 3):  # pruning runs after each save
        writer.save(state(step), step)
    assert {name: (tmp_path / name).read_bytes() for name in mine} == mine
    assert step_files(run.checkpoints) == [run.checkpoints / "step-00000003.pt"]


def test_the_newest_checkpoint_is_chosen_by_step_number(tmp_path):
    folder = tmp_path / "checkpoints"
    writer = Checkpointer(folder, keep=5, is_main=True)
    for step in (99_999_999, 100_000_000):  # step-100000000.pt sorts before step-99999999.pt by name
        writer.save(state(step), step)
    assert Checkpointer(folder, keep=5, is_main=True).choose({}) == folder / "step-100000000.pt"


def test_checkpoints_that_link_out_of_the_run_folder_are_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.checkpoints.symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match=r"checkpoints is a link .*: checkpoints are written only inside"):
        Checkpointer(run.checkpoints, keep=1, is_main=True).choose({})
    with pytest.raises(ConfigError, match="is a link"):
        run.prepare(TrainConfig().resolved(), resuming=False)
    assert not any(elsewhere.iterdir())

"""Checkpoint bookkeeping: damaged checkpoints never cost the good ones, best.pt stands apart, and
the final weights are always the ones results.json scores."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import base_env, ddp_mnist, results, train
from test_faults import complete_steps, flip_bytes

from ddp_mnist.artifacts.checkpoint import Checkpointer
from ddp_mnist.artifacts.run_dir import read_metrics
from ddp_mnist.errors import CheckpointError


def state(step: int, accuracy: float | None = None) -> dict:
    """A small stand-in for the trainer's state: what Checkpointer reads of it, and a tensor."""
    return {
        "epoch": 0,
        "step_in_epoch": step,
        "config": {},
        "model": {"w": torch.full((3,), float(step))},
        "last_test": {} if accuracy is None else {"test_accuracy": accuracy},
    }


def test_a_damaged_checkpoint_never_costs_the_good_ones(tmp_path, caplog):
    """The reported case: checkpoints at steps 5 and 10, step 10 damaged, the job resumed from 5 with
    --keep-checkpoints 1 and another cadence, so that its next save is step 6. Pruning by name alone kept
    the damaged step 10 and deleted 5 and 6, and the next resume found no usable checkpoint."""
    folder = tmp_path / "checkpoints"
    writer = Checkpointer(folder, keep=2, is_main=True)
    for step in (5, 10):
        writer.save(state(step), step)
    flip_bytes(folder / "step-00000010.pt")
    resumed = Checkpointer(folder, keep=1, is_main=True)
    with caplog.at_level(logging.WARNING, logger="ddp_mnist"):
        assert resumed.choose({}) == folder / "step-00000005.pt"
    assert "step-00000010.pt is damaged (corrupt or truncated" in caplog.text
    assert sorted(p.name for p in (folder / "damaged").iterdir()) == ["step-00000010.json", "step-00000010.pt"]
    resumed.save(state(6), 6)
    assert complete_steps(folder) == [6]
    assert resumed.choose({}) == folder / "step-00000006.pt"


def test_damage_found_while_pruning_is_set_aside_not_counted(tmp_path):
    folder = tmp_path / "checkpoints"
    writer = Checkpointer(folder, keep=2, is_main=True)
    for step in (1, 2):
        writer.save(state(step), step)
    flip_bytes(folder / "step-00000002.pt")  # damaged on disk after it was written
    writer.save(state(3), 3)
    assert complete_steps(folder) == [1, 3]  # two intact ones: the damaged one did not count towards keep=2
    assert (folder / "damaged" / "step-00000002.pt").exists()


def test_all_damaged_is_an_error_and_moves_nothing(tmp_path):
    folder = tmp_path / "checkpoints"
    writer = Checkpointer(folder, keep=2, is_main=True)
    for step in (1, 2):
        writer.save(state(step), step)
    for step in (1, 2):
        flip_bytes(folder / f"step-{step:08d}.pt")
    with pytest.raises(Exception, match="no usable checkpoint"):
        writer.choose({})
    assert complete_steps(folder) == [1, 2] and not (folder / "damaged").exists()


def test_best_checkpoint_never_counts_and_is_never_resumed(tmp_path):
    folder = tmp_path / "checkpoints"
    writer = Checkpointer(folder, keep=1, is_main=True)
    writer.save(state(1, accuracy=90.0), 1, best=True)
    writer.save(state(2, accuracy=89.0), 2)
    writer.save(state(3), 3)
    assert complete_steps(folder) == [3]  # keep=1 counted step 3 only; best.pt did not take its place
    best = torch.load(folder / "best.pt", weights_only=True)
    assert torch.equal(best["model"]["w"], torch.full((3,), 1.0))
    meta = json.loads((folder / "best.json").read_text())
    assert meta["global_step"] == 1 and meta["test_accuracy"] == 90.0 and meta["copied_from"] == "step-00000001.pt"
    assert writer.choose({}) == folder / "step-00000003.pt"
    for p in folder.glob("step-*"):
        p.unlink()
    assert writer.choose({}) is None  # best.pt alone is not a checkpoint to resume from


def test_best_pt_is_no_fallback_when_every_step_checkpoint_is_damaged(tmp_path):
    """Resume reads step checkpoints only: an intact best.pt is not resumed from (it may be epochs old), and
    the error leaves it in place. `export --best` checks best.pt against best.json's hash."""
    folder = tmp_path / "checkpoints"
    writer = Checkpointer(folder, keep=2, is_main=True)
    writer.save(state(1, accuracy=90.0), 1, best=True)
    writer.save(state(2), 2)
    for step in (1, 2):
        flip_bytes(folder / f"step-{step:08d}.pt")
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*: step-00000002.pt .*; step-00000001.pt"):
        writer.choose({})
    assert writer.intact_best() == folder / "best.pt"
    flip_bytes(folder / "best.pt")
    with pytest.raises(CheckpointError, match="best.pt is not usable: corrupt or truncated"):
        writer.intact_best()


@pytest.mark.process
def test_final_weights_are_evaluated_when_eval_every_skips_the_last_epoch(tmp_path, data_dir):
    """--max-steps ends the run at the end of epoch 3, which --eval-every 2 skips: results.json must score the
    final weights (it reported epoch 2's accuracy), and best.pt follows the best evaluation."""
    run = tmp_path / "run"
    train(
        1,
        run,
        data_dir,
        "--recipe",
        "tutorial",
        "--batch-size",
        "600",
        "--epochs",
        "5",
        "--eval-every",
        "2",
        "--max-steps",
        "300",
    )
    rows = read_metrics(run)
    assert [("test_accuracy" in r) for r in rows] == [False, True, False]
    final = results(run)
    assert final["steps"] == 300 and final["test_accuracy"] != rows[1]["test_accuracy"]
    out = tmp_path / "eval.json"
    ddp_mnist(1, "evaluate", str(run / "checkpoints" / "step-00000300.pt"), "--out", str(out), env=base_env(data_dir))
    assert json.loads(out.read_text())["test_correct"] == final["test_correct"]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["test_accuracy"] == max(final["test_accuracy"], rows[1]["test_accuracy"])

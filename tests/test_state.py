"""The checkpoint's entries come from one place each: the Trainer's modules, TrainState's fields and the
Meter's fields (state.py, meter.py). Their names are a contract (tools and older checkpoints read them)."""

from __future__ import annotations

import io

import pytest
import torch

from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.training.meter import Meter
from ddp_mnist.training.settings import RunSettings
from ddp_mnist.training.signals import StopSignals
from ddp_mnist.training.state import TrainState
from ddp_mnist.training.trainer import Trainer

# The top-level entries of step-*.pt (docs/design.md, Checkpoint contents: `model` is the unwrapped model's state_dict).
CHECKPOINT_KEYS = {
    "model",
    "optimizer",
    "comm_hook",
    "scheduler",
    "scaler",
    "rng",
    "config",
    "epoch",
    "step_in_epoch",
    "global_step",
    "last_test",
    "last_test_step",
    "best_accuracy",
    "tracker_run_id",
    "train_seconds",
    "time_to_target",
    "epoch_loss_sum",
    "epoch_seconds",
    "skipped_steps",
    "steady_seconds",
    "steady_steps",
}
# Entries that checkpoints written before them lack: they load with their defaults.
ADDED_LATER = {"last_test_step": None, "best_accuracy": None, "steady_seconds": 0.0, "steady_steps": 0}


def test_checkpoint_entries_are_unchanged_and_none_shadows_another(tmp_path, data_dir):
    cfg = TrainConfig(recipe="tutorial", device="cpu", data_dir=str(data_dir), run_dir=str(tmp_path / "run")).resolved()
    trainer = Trainer(cfg, DistEnv(), RunSettings.here(cfg, torch.device("cpu")), StopSignals())
    trainer.state.global_step, trainer.meter.train_seconds = 7, 1.5
    saved = trainer.state_dict(rng=[], parallel=trainer.strategy.state_dict())
    assert set(saved) == CHECKPOINT_KEYS
    parts = [trainer.state.state_dict(), trainer.meter.state_dict()]
    assert sum(map(len, parts)) + 7 == len(saved), "a TrainState field and a Meter field share a name"

    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # only tensors, plain containers and primitives
    state, meter = TrainState(), Meter(torch.device("cpu"), warmup_steps=20)
    state.load_state_dict(loaded)
    meter.load_state_dict(loaded)
    assert state == trainer.state and (state.global_step, meter.train_seconds) == (7, 1.5)
    assert meter.state_dict() == trainer.meter.state_dict()


def test_an_older_checkpoint_loads_with_defaults_and_a_foreign_file_does_not():
    newer = {
        **TrainState(epoch=2, best_accuracy=97.0).state_dict(),
        **Meter(torch.device("cpu"), 20, steady_seconds=3.0, steady_steps=9).state_dict(),
    }
    older = {k: v for k, v in newer.items() if k not in ADDED_LATER}
    state, meter = TrainState(best_accuracy=50.0), Meter(torch.device("cpu"), 20, steady_steps=4)
    state.load_state_dict(older)
    meter.load_state_dict(older)
    assert state.epoch == 2 and {**state.state_dict(), **meter.state_dict()} == {**older, **ADDED_LATER}
    with pytest.raises(KeyError, match="global_step"):
        TrainState().load_state_dict({k: v for k, v in newer.items() if k != "global_step"})


def test_train_seconds_leave_out_evaluation_and_checkpoints(tmp_path, data_dir, monkeypatch):
    """A fake clock that a step moves by 1 s and a checkpoint or an evaluation by 1000 s: train_seconds
    counts the steps only, also around the mid-epoch checkpoints of --checkpoint-every."""
    clock = [0.0]
    monkeypatch.setattr("ddp_mnist.training.meter.time.perf_counter", lambda: clock[0])
    cfg = TrainConfig(
        recipe="tutorial",
        batch_size=600,
        max_steps=6,
        checkpoint_every=2,
        eval_every=1,
        device="cpu",
        data_dir=str(data_dir),
        run_dir=str(tmp_path / "run"),
        progress=False,
    ).resolved()
    trainer = Trainer(cfg, DistEnv(), RunSettings.here(cfg, torch.device("cpu")), StopSignals())

    def takes(seconds, work):
        def timed(*args, **kwargs):
            clock[0] += seconds
            return work(*args, **kwargs)

        return timed

    trainer.train_step = takes(1.0, trainer.train_step)  # fit() chooses the (eager) step from this attribute
    trainer.checkpointer.save = takes(1000.0, trainer.checkpointer.save)
    trainer.evaluate = takes(1000.0, trainer.evaluate)
    results = trainer.fit()
    assert results["steps"] == 6 and clock[0] > 3000  # 2 mid-run checkpoints, the final evaluation and checkpoint
    assert results["train_seconds"] == 6.0

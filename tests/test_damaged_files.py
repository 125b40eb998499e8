"""Every file ddp-mnist reads back may be damaged in any way: cut, empty, not UTF-8, valid JSON of the wrong
shape, values out of range (issue "Nothing of the user's lost", rule 3). Reading one either recovers (a cut last
line of metrics.jsonl is dropped with a warning) or ends with one line naming the file; it never hangs, never
loops, and never changes a file before everything a resume checks has been checked. No process is started."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ddp_mnist.artifacts.checkpoint import Checkpointer
from ddp_mnist.artifacts.config_sources import read_settings
from ddp_mnist.artifacts.run_dir import RunDir, finished_run, read_metrics, read_results
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.errors import CheckpointError, ConfigError
from ddp_mnist.files import file_digest
from ddp_mnist.training.state import TrainState

ROWS = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.4}]


def run_with_metrics(tmp_path, tail: bytes):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.metrics.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in ROWS) + tail)
    return run


@pytest.mark.parametrize(
    "tail",
    [b'{"epoch": 3, "train_lo', b"\xff\xfe\x00", b"[1, 2]", b'{"epoch": "3"}', b"[" * 100_000],
    ids=["cut", "not-utf8", "a-list", "epoch-not-int", "deep"],
)
def test_a_cut_last_line_of_metrics_is_dropped_with_a_warning(tmp_path, caplog, tail):
    """The reported case: a full disk while a line was appended left half a line, and every --resume (so every
    torchrun restart and SLURM requeue) died on a JSONDecodeError: the job could never continue."""
    run = run_with_metrics(tmp_path, tail)
    with caplog.at_level(logging.WARNING, logger="ddp_mnist"):
        assert read_metrics(run.path) == ROWS
    assert "last line is cut short" in caplog.text and str(run.metrics) in caplog.text
    run.trim_metrics(last_epoch=1)  # what a resume from epoch 1 does: the cut line goes too
    assert run.metrics.read_bytes() == json.dumps(ROWS[0]).encode() + b"\n"


def test_damage_inside_metrics_is_one_line_naming_the_file_and_line(tmp_path):
    run = run_with_metrics(tmp_path, b"")
    lines = run.metrics.read_bytes().splitlines()
    run.metrics.write_bytes(lines[0] + b"\n\x00garbage\n" + lines[1] + b"\n")
    before = run.metrics.read_bytes()
    with pytest.raises(ConfigError, match=r"metrics\.jsonl line 2 is damaged"):
        read_metrics(run.path)
    with pytest.raises(ConfigError, match="line 2"):
        run.trim_metrics(last_epoch=1)
    assert run.metrics.read_bytes() == before  # nothing rewritten


@pytest.mark.parametrize("content", [b"", b'{"test_accuracy": 9', b"\xff\xfe", b"[98.6]", b"[" * 100_000], ids=str)
def test_a_damaged_results_json_is_one_line_and_a_resume_trains_on(tmp_path, content):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.results.write_bytes(content)
    with pytest.raises(ConfigError, match=r"results\.json (is damaged|cannot be read)"):
        read_results(run.path)
    cfg = TrainConfig(run_dir=str(run.path), resume=True, max_steps=10).resolved()
    assert finished_run(cfg) is None  # not known to be finished: the resume trains, and rewrites it


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfelr = 0.1\n", "is not UTF-8 text"),
        (b"[" * 100_000, "nested too deeply|not valid JSON"),
        (b"[1, 2]", "must hold a table of settings"),
        (b'{"lr": "fast"}', "lr = 'fast' is not a float"),
    ],
)
def test_a_damaged_config_file_is_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_settings(path)


def checkpoint_state(step: int) -> dict:
    return {"epoch": 0, "step_in_epoch": step, "config": {}, "model": {"w": torch.zeros(2)}, "last_test": {}}


@pytest.mark.parametrize("sidecar", [b"[1, 2]", b"\xff\xfe", b'"text"', b"[" * 100_000], ids=str)
def test_a_sidecar_of_the_wrong_shape_sets_the_checkpoint_aside(tmp_path, sidecar):
    folder = tmp_path / "checkpoints"
    writer = Checkpointer(folder, keep=5, is_main=True)
    writer.save(checkpoint_state(1), 1)
    writer.save(checkpoint_state(2), 2)
    (folder / "step-00000002.json").write_bytes(sidecar)
    assert Checkpointer(folder, keep=5, is_main=True).choose({}) == folder / "step-00000001.pt"


def test_a_checkpoint_that_is_not_a_dict_is_skipped_not_a_traceback(tmp_path):
    folder = tmp_path / "checkpoints"
    writer = Checkpointer(folder, keep=5, is_main=True)
    writer.save(checkpoint_state(1), 1)
    pt = folder / "step-00000002.pt"  # right hash, wrong contents
    torch.save([1, 2, 3], pt)
    pt.with_suffix(".json").write_text(json.dumps({"file": pt.name, "sha256": file_digest(pt, "sha256")}))
    assert Checkpointer(folder, keep=5, is_main=True).choose({}) == folder / "step-00000001.pt"


def test_checkpoints_that_is_a_file_is_an_error_before_anything_is_written(tmp_path):
    """The reported case: --resume said "starting from the beginning", emptied metrics.jsonl, rewrote
    config.json, then crashed at the first save."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.checkpoints.write_text("not a folder")
    run.metrics.write_text(json.dumps(ROWS[0]) + "\n")
    before = {p.name: p.read_bytes() for p in run.path.iterdir()}
    with pytest.raises(CheckpointError, match="is not a folder"):
        Checkpointer(run.checkpoints, keep=1, is_main=True).choose({})
    for resuming in (True, False):
        with pytest.raises(ConfigError, match="checkpoints is not a folder"):
            run.prepare(TrainConfig().resolved(), resuming=resuming)
    assert {p.name: p.read_bytes() for p in run.path.iterdir()} == before


@pytest.mark.parametrize(
    "position",
    [(0, 10**12, 10**12), (0, -1, -1), (99, 0, 99 * 117), (1, 3, 7), (0, 1.5, 1.5), (True, 0, 117)],
)
def test_an_impossible_position_in_a_checkpoint_is_refused(position):
    """The reported case: a checkpoint whose hash is right but whose recorded position is impossible spun one
    core forever (and one SIGTERM did not end it)."""
    epoch, step, global_step = position
    state = TrainState(epoch=epoch, step_in_epoch=step, global_step=global_step)
    with pytest.raises(ValueError, match="impossible position"):
        state.check_position(steps_per_epoch=117, epochs=6)
    TrainState(epoch=6, step_in_epoch=0, global_step=6 * 117).check_position(117, 6)  # the end of the job
    TrainState(epoch=2, step_in_epoch=5, global_step=239).check_position(117, 6)

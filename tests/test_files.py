"""Writes in shared folders cannot be redirected: a symlink planted where the package writes (the
temporary files' old fixed names, or the target files themselves) never leads a write onto another file."""

from __future__ import annotations

import errno
import json

import pytest
from conftest import results, train

from ddp_mnist.files import append_line, file_lock, write_json_atomic

VICTIM = "someone else's file\n"


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM)
    return path


@pytest.mark.process
def test_planted_symlinks_in_a_run_folder_redirect_nothing(tmp_path, victim, data_dir):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    planted = [
        run / ".results.json.tmp",
        run / ".tracker.json.tmp",
        run / ".config.json.tmp",
        run / "checkpoints" / ".step-00000005.pt.tmp",
        run / "checkpoints" / ".step-00000005.json.tmp",
        run / "checkpoints" / ".step-00000010.pt.tmp",
        run / "results.json.tmp",
    ]
    for link in planted:
        link.symlink_to(victim)
    train(1, run, data_dir, "--recipe", "tutorial", "--max-steps", "10", "--checkpoint-every", "5")
    assert victim.read_text() == VICTIM
    assert results(run)["steps"] == 10 and not (run / "results.json").is_symlink()
    assert json.loads((run / "config.json").read_text())["recipe"] == "tutorial"


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path, victim):
    target = tmp_path / "results.json"
    target.symlink_to(victim)
    write_json_atomic(target, {"ok": 1})
    assert victim.read_text() == VICTIM
    assert not target.is_symlink() and json.loads(target.read_text()) == {"ok": 1}


def test_append_and_lock_refuse_a_symlink(tmp_path, victim):
    for path, use in [
        (tmp_path / "metrics.jsonl", lambda p: append_line(p, "{}")),
        (tmp_path / ".download.lock", lambda p: file_lock(p).__enter__()),
    ]:
        path.symlink_to(victim)
        with pytest.raises(OSError) as error:
            use(path)
        assert error.value.errno == errno.ELOOP
    assert victim.read_text() == VICTIM

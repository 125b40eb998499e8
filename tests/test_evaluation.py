"""Exact distributed evaluation: one checkpoint evaluated at 1, 2 and 3 ranks gives the same count of
correct answers, over exactly the 10,000 test images, and the same count as training reported for it.

The same weights are evaluated each time, so equality is the claim; comparing the accuracies of runs
trained at different world sizes would also compare their (CPU-dependent) rounding.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import base_env, ddp_mnist, results, train

pytestmark = pytest.mark.process  # every test here starts processes (docs/testing.md)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("evaluate") / "run"
    train(1, run, data_dir, "--recipe", "tutorial", "--batch-size", "600", "--max-steps", "30")
    return run


def evaluate(nproc: int, source, out, data_dir) -> dict:
    proc = ddp_mnist(nproc, "evaluate", str(source), "--out", str(out), env=base_env(data_dir))
    result = json.loads(out.read_text())
    assert f"({result['test_correct']}/10000)" in proc.stdout and proc.stdout.count("test accuracy") == 1
    return result


def test_one_checkpoint_gives_identical_counts_at_1_2_3_ranks(trained, tmp_path, data_dir):
    checkpoint = sorted((trained / "checkpoints").glob("step-*.pt"))[-1]
    found = {n: evaluate(n, checkpoint if n != 2 else trained, tmp_path / f"{n}.json", data_dir) for n in (1, 2, 3)}
    for n, result in found.items():
        assert result["world_size"] == n and result["test_samples"] == 10_000
        assert result["checkpoint"] == str(checkpoint) and result["global_step"] == 30
    assert found[1]["test_correct"] == found[2]["test_correct"] == found[3]["test_correct"]
    for n in (2, 3):  # the loss is a float sum in another order: equal up to rounding
        assert math.isclose(found[n]["test_loss"], found[1]["test_loss"], rel_tol=1e-6)
    # Training's own evaluation of those weights (results.json) counted the same.
    trained_result = results(trained)
    assert trained_result["test_correct"] == found[1]["test_correct"]
    assert trained_result["test_accuracy"] == found[1]["test_accuracy"]


def test_evaluate_names_a_bad_source(tmp_path, data_dir):
    proc = ddp_mnist(1, "evaluate", str(tmp_path / "nothing"), env=base_env(data_dir), check=False)
    assert proc.returncode == 2
    assert f"ddp-mnist: error: {tmp_path / 'nothing'} is neither a checkpoint file nor a run folder" in proc.stderr

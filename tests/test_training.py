"""What the training step does, checked from the inside: the CNN learns, --grad-clip with fp16 clips the
true gradient, and gradient accumulation all-reduces once per optimizer step (DDP's no_sync).

The step tests build the real Trainer in-process (one rank) or in each rank of a torchrun job (gloo),
and look at the gradients and collectives it produces.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

import pytest
import torch
from conftest import base_env, free_port, results, run_cmd, train

from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.model import build_model
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.training.settings import RunSettings
from ddp_mnist.training.signals import StopSignals
from ddp_mnist.training.trainer import Trainer


@pytest.mark.process
@pytest.mark.slow
def test_cnn_fast_recipe_one_epoch_reaches_98_percent(tmp_path, data_dir):
    """One epoch of the fast CNN recipe (batch 256: 234 steps), one process: it may use both cores (the suite's
    default of one thread per process is for several ranks sharing them; about 40% less time here)."""
    run_dir = tmp_path / "run"
    train(1, run_dir, data_dir, "--model", "cnn", "--epochs", "1", timeout=600, OMP_NUM_THREADS="2")
    res = results(run_dir)
    print(f"cnn, fast recipe, 1 epoch: {res['test_accuracy']:.2f}% in {res['train_seconds']:.1f} s")
    assert (res["model"], res["recipe"], res["batch_size"], res["steps"]) == ("cnn", "fast", 256, 234)
    assert res["test_accuracy"] >= 98.0


# ---------------------------------------------------------------------- --grad-clip with fp16
CLIP = 0.05  # well under the MLP's gradient norm on its first batch (about 0.3; checked below)


def test_grad_clip_with_fp16_clips_the_unscaled_gradient(tmp_path, data_dir):
    cfg = TrainConfig(
        recipe="tutorial",
        precision="fp16",
        grad_clip=CLIP,
        device="cpu",
        data_dir=str(data_dir),
        run_dir=str(tmp_path / "run"),
    ).resolved()
    trainer = Trainer(cfg, DistEnv(), RunSettings.here(cfg, torch.device("cpu")), StopSignals())
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() >= 2.0**10  # scaled grads differ a lot
    images, labels = next(trainer.batches.epoch(0))

    # The true gradient, computed independently: fp32, no autocast, no scaler, same initial weights.
    reference = build_model("mlp")
    reference.load_state_dict(trainer.model.state_dict())
    x = images.float().div(255).unsqueeze(1)  # --normalize unit
    torch.nn.functional.cross_entropy(reference(x), labels).backward()
    true_grad = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert true_grad.norm() > 4 * CLIP, f"gradient norm {true_grad.norm():.3f}: clipping at {CLIP} would not bite"

    # What the optimizer is handed: the gradients as they are when its step() runs.
    seen, before = [], [p.detach().clone() for p in trainer.model.parameters()]
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.train_step(images, labels)
    assert len(seen) == 1 and trainer.meter.skipped_steps == 0, "the scaler skipped the step"
    (grad,) = seen
    print(f"true norm {true_grad.norm():.4f}, after clipping {grad.norm():.6f} (clip {CLIP})")
    # Clipped to CLIP: not left at the true norm (no clipping), not CLIP / scale (the scaled ones clipped).
    assert abs(grad.norm().item() - CLIP) <= 1e-3 * CLIP
    # The same direction as the true gradient (fp16 rounding aside): the unscaled gradient, only shortened.
    assert torch.nn.functional.cosine_similarity(grad, true_grad, dim=0) > 0.999
    # And that is what SGD applied: p -= lr * clipped gradient.
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    update = torch.cat([p.flatten() for p in before]) - after
    assert torch.allclose(update, cfg.lr * grad, atol=1e-8, rtol=1e-4)


# ---------------------------------------------------------------------- no_sync with --grad-accum
COUNT_ALL_REDUCES = '''
import gc, json, sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from ddp_mnist.config import TrainConfig
from ddp_mnist.parallel.env import DistEnv
from ddp_mnist.parallel.process_group import process_group
from ddp_mnist.training.settings import RunSettings
from ddp_mnist.training.signals import StopSignals
from ddp_mnist.training.trainer import Trainer


def count_all_reduces(trainer, steps):
    """The bucket index of every all-reduce DDP starts, per optimizer step."""
    buckets = []

    def counting_hook(group, bucket):
        buckets.append(bucket.index())
        return default_hooks.allreduce_hook(group, bucket)

    trainer.strategy.ddp.register_comm_hook(None, counting_hook)
    per_step, batches = [], trainer.batches.epoch(0)
    for _ in range(steps):
        start = len(buckets)
        trainer.train_step(*next(batches))
        per_step.append(buckets[start:])
    return per_step


grad_accum, steps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
env, device = DistEnv.from_environ(), torch.device("cpu")
cfg = TrainConfig(recipe="tutorial", batch_size=96, grad_accum=grad_accum, device="cpu",
                  run_dir=f"{out}/run").resolved()
with process_group(env, "gloo", device, 60):
    per_step = count_all_reduces(Trainer(cfg, env, RunSettings.here(cfg, device), StopSignals()), steps)
    # The Trainer is in a reference cycle (self.step_fn = self.train_step): collect it, and its DDP, while the
    # group exists. Left to interpreter exit, that teardown aborted rank 0 about once in 15 runs
    # ("terminate called without an active exception").
    gc.collect()
with open(f"{out}/rank{env.rank}.json", "w") as f:
    json.dump(per_step, f)
'''


@pytest.mark.process
def test_grad_accum_all_reduces_once_per_optimizer_step(tmp_path, data_dir):
    """2 gloo ranks, --grad-accum 4: a DDP communication hook counts the all-reduces. Each optimizer
    step all-reduces every bucket exactly once (the 3 inner micro-batches run under no_sync)."""
    script = tmp_path / "count_all_reduces.py"
    script.write_text(COUNT_ALL_REDUCES)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(script),
        "4",
        "3",
        str(tmp_path),
    ]
    run_cmd(cmd, base_env(data_dir), timeout=180)
    for rank in (0, 1):
        per_step = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(per_step) == 3
        for step, buckets in enumerate(per_step, 1):
            counts = Counter(buckets)
            print(f"rank {rank} step {step}: all-reduces per bucket {dict(counts)}")
            assert buckets, f"rank {rank} step {step}: no all-reduce at all"
            assert set(counts.values()) == {1}, (
                f"rank {rank} step {step}: buckets all-reduced {dict(counts)} times; with --grad-accum 4 each "
                f"bucket must be all-reduced once per optimizer step, not once per micro-batch"
            )


# ------------------------------------------------------------------------------------------------
# --deterministic
# ------------------------------------------------------------------------------------------------
@pytest.mark.process
def test_deterministic_cnn_trained_twice_gives_identical_parameters(tmp_path, data_dir):
    """The CNN (convolutions: where cuDNN and oneDNN pick algorithms) trained twice with --deterministic on 2
    ranks: bit-identical parameters, and the switch recorded in config.json and results.json."""
    from conftest import final_model, max_param_diff

    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        train(2, run, data_dir, "--model", "cnn", "--recipe", "tutorial", "--max-steps", "10", "--deterministic")
    assert max_param_diff(final_model(runs[0]), final_model(runs[1])) == 0.0
    assert results(runs[0])["deterministic"] is True
    assert json.loads((runs[0] / "config.json").read_text())["deterministic"] is True


def test_an_operation_without_a_deterministic_version_is_a_clear_error():
    """torch's own error (its words, as torch.use_deterministic_algorithms documents them) becomes one line
    naming the operation and what to do; any other error is left alone."""
    from ddp_mnist.training.determinism import explain_nondeterministic

    torch_error = RuntimeError(
        "avg_pool3d_backward_cuda does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this operation, ..."
    )
    clear = explain_nondeterministic(torch_error)
    assert clear is not None and str(clear).startswith(
        "--deterministic: avg_pool3d_backward_cuda has no deterministic implementation on this device; run without"
    )
    assert explain_nondeterministic(RuntimeError("CUDA out of memory")) is None
    assert explain_nondeterministic(ValueError("x does not have a deterministic implementation")) is None


@pytest.mark.process
def test_a_batch_log_gets_lines_not_progress_bars(tmp_path, data_dir):
    """Into a file (a batch job's log) the default draws no progress bar, whose redraws would fill it with
    fragments; --step-lines prints a line every --log-every steps, and every other line stays."""
    from conftest import ddp_mnist

    run = tmp_path / "run"
    args = ("--recipe", "tutorial", "--max-steps", "100", "--log-every", "50", "--step-lines")
    proc = ddp_mnist(1, "train", "--run-dir", str(run), *args, env=base_env(data_dir))
    output = proc.stdout + proc.stderr
    assert "\r" not in output and "step/s" not in output and "it/s" not in output, output  # no tqdm bar
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split("  ")[0] for line in lines] == ["step 50/100", "step 100/100"], proc.stdout
    assert all(re.fullmatch(r"step \d+/100  loss \d\.\d{4}  lr 1\.00e-02", line) for line in lines), lines
    assert "done: test accuracy" in proc.stdout


@pytest.mark.process
def test_tensorboard_and_steps_file_hold_the_step_and_epoch_metrics(tmp_path, data_dir):
    """--tensorboard writes RUN/tensorboard/ (read back with tensorboard's own reader): the scalars W&B gets,
    per logged step and per epoch, and the config as text; RUN/steps.jsonl holds a line every --log-every steps
    with samples/s over the window (metrics.jsonl keeps one line per epoch)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(
        1,
        run,
        data_dir,
        "--recipe",
        "tutorial",
        "--batch-size",
        "1000",
        "--epochs",
        "2",
        "--log-every",
        "20",
        "--tensorboard",
    )
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [20, 40, 60, 80, 100, 120]
    assert all(e.value > 0 for e in events.Scalars("train/samples_per_second"))
    assert [e.step for e in events.Scalars("epoch/test_accuracy")] == [60, 120]
    assert [e.step for e in events.Scalars("epoch/train_loss")] == [60, 120]
    assert {"train/lr", "train/achieved_tflops", "epoch/samples_per_second"} <= set(scalars), scalars
    assert "config/text_summary" in events.Tags()["tensors"]
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [row["global_step"] for row in steps] == [20, 40, 60, 80, 100, 120]
    assert all(row["samples_per_second"] > 0 and row["achieved_tflops"] > 0 for row in steps)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

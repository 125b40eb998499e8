"""The typed config: recipes, explicit flags, validation messages, the CLI mapping. No processes."""

from __future__ import annotations

import dataclasses
import socket
import typing

import pytest
import torch
from conftest import parse

from ddp_mnist.artifacts.checkpoint import check_compatible
from ddp_mnist.commands.arguments import fields_by_group
from ddp_mnist.commands.cli import build_parser
from ddp_mnist.config.options import GROUPS, RECIPE, option, recipe_values
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.config.validation import RANGES
from ddp_mnist.errors import ConfigError
from ddp_mnist.parallel import process_group
from ddp_mnist.parallel.device import gpu_index, pick_backend, pick_device, shared_gpus
from ddp_mnist.parallel.env import DistEnv, slurm_port

# Every hyper-parameter a recipe sets (written out; a recipe that stops setting one leaves it None).
RECIPE_KEYS = {
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "schedule",
    "label_smoothing",
    "normalize",
    "precision",
}


# ------------------------------------------------------------------ recipes
def test_tutorial_recipe_is_the_tutorial_as_written():
    cfg = TrainConfig(recipe="tutorial").resolved()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.optimizer, cfg.momentum) == (10, 100, 0.01, "sgd", 0.0)
    assert (cfg.weight_decay, cfg.schedule, cfg.label_smoothing) == (0.0, "constant", 0.0)
    assert (cfg.normalize, cfg.precision) == ("unit", "fp32")  # ToTensor scaling, full precision


# The fast recipes' values, written out: reading them back from recipe_values would agree with itself.
FAST = {
    "mlp": dict(
        epochs=6,
        batch_size=512,
        lr=3e-3,
        optimizer="adamw",
        momentum=0.0,
        weight_decay=0.05,
        schedule="onecycle",
        label_smoothing=0.1,
        normalize="standard",
        precision="auto",
    ),
    "cnn": dict(
        epochs=4,
        batch_size=256,
        lr=3e-3,
        optimizer="adamw",
        momentum=0.0,
        weight_decay=0.05,
        schedule="onecycle",
        label_smoothing=0.1,
        normalize="standard",
        precision="auto",
    ),
}


def test_fast_recipe_is_the_default_and_depends_on_the_model():
    mlp = TrainConfig().resolved()
    cnn = TrainConfig(model="cnn").resolved()
    assert mlp.recipe == "fast"
    for cfg in (mlp, cnn):
        assert {k: getattr(cfg, k) for k in FAST[cfg.model]} == FAST[cfg.model], cfg.model
    assert (mlp.target_accuracy, cnn.target_accuracy) == (98.0, 99.0)


def test_tutorial_recipe_is_the_same_for_both_models():
    assert TrainConfig(recipe="tutorial", model="cnn").resolved().to_dict() == {
        **TrainConfig(recipe="tutorial", model="mlp").resolved().to_dict(),
        "model": "cnn",
        "target_accuracy": 99.0,
    }


@pytest.mark.parametrize("recipe", ["tutorial", "fast"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_resolution_fills_every_recipe_value(recipe, model):
    cfg = TrainConfig(recipe=recipe, model=model).resolved()
    for key in RECIPE_KEYS:
        assert getattr(cfg, key) is not None, key
    assert cfg.resolved() == cfg  # resolving twice changes nothing (run_training resolves again)


def test_resolution_does_not_modify_the_original():
    cfg = TrainConfig(recipe="tutorial")
    cfg.resolved()
    assert cfg.epochs is None and cfg.lr is None


# ------------------------------------------------------------------ explicit flags win
def test_explicit_flags_override_the_recipe():
    cfg = parse(
        "--recipe",
        "tutorial",
        "--lr",
        "0.1",
        "--batch-size",
        "120",
        "--epochs",
        "2",
        "--momentum",
        "0.9",
        "--precision",
        "bf16",
    ).resolved()
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.momentum, cfg.precision) == (0.1, 120, 2, 0.9, "bf16")
    assert cfg.optimizer == "sgd" and cfg.schedule == "constant"  # the rest still from the recipe


def test_explicit_zero_is_kept_not_replaced_by_the_recipe():
    cfg = parse("--weight-decay", "0", "--label-smoothing", "0").resolved()  # fast recipe: 0.05 and 0.1
    assert (cfg.weight_decay, cfg.label_smoothing) == (0.0, 0.0)


def test_cli_maps_flags_to_fields():
    cfg = parse(
        "--no-progress", "--resume", "--run-dir", "no-such-run", "--wandb-tags", "a,b,", "--expected-world-size", "4"
    )
    assert (cfg.progress, cfg.resume, cfg.wandb_tags, cfg.expected_world_size) == (False, True, ["a", "b"], 4)
    defaults = parse()
    assert defaults == TrainConfig()  # no flag: every field keeps the dataclass default
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags  # one flag per field


def test_config_round_trip_and_unknown_keys():
    cfg = TrainConfig(recipe="tutorial", batch_size=120).resolved()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config keys"):
        TrainConfig.from_dict({**cfg.to_dict(), "no_such_key": 1})


def test_an_old_config_with_compile_loads_as_cuda_graph(tmp_path):
    """`--compile` was renamed `--cuda-graph`: config.json files and checkpoints written before still read,
    and a checkpoint written before continues the same job."""
    current = TrainConfig(recipe="tutorial", cuda_graph="off").resolved()
    old = {("compile" if k == "cuda_graph" else k): v for k, v in current.to_dict().items()}
    assert "cuda_graph" not in old
    assert TrainConfig.from_dict(old) == current
    assert TrainConfig.from_dict({"compile": "on"}).cuda_graph == "on"
    assert TrainConfig.from_dict({"compile": "on", "cuda_graph": "off"}).cuda_graph == "off"  # the new key wins
    check_compatible(old, current.to_dict(), tmp_path / "step-00000001.pt")  # no CheckpointError


# ------------------------------------------------------------------ the fields' groups
def test_every_field_is_in_one_group_and_the_groups_are_sections():
    fields = dataclasses.fields(TrainConfig)
    assert all(f.metadata["group"] in GROUPS for f in fields)
    order = [list(GROUPS).index(f.metadata["group"]) for f in fields]
    assert order == sorted(order)  # the fields are written in sections, in GROUPS order
    assert sum(map(len, fields_by_group().values())) == len(fields)
    assert all(fields_by_group().values())  # no empty group
    distributed_fields = {f.name for f in fields_by_group()["distributed"]}
    assert {"backend", "timeout_s", "expected_world_size", "requeue_signal"} <= distributed_fields


def test_a_default_of_none_must_say_what_it_means():
    fields = dataclasses.fields(TrainConfig)
    assert all(f.metadata["shown"] for f in fields if f.default is None)
    recipe_filled = {f.name for f in fields if f.metadata["shown"] == RECIPE}
    assert recipe_filled == set(recipe_values("fast", "mlp")) == set(recipe_values("tutorial", "cnn"))
    with pytest.raises(ValueError, match="must say what None means"):
        option(None, "A value.", group="data")
    with pytest.raises(ValueError, match="is not one of"):
        option(1, "A value.", group="misc")


def test_steps():
    cfg = TrainConfig(recipe="tutorial", batch_size=120, epochs=2).resolved()
    assert (cfg.steps_per_epoch, cfg.total_steps) == (500, 1000)
    assert dataclasses.replace(cfg, max_steps=300).total_steps == 300
    assert TrainConfig(batch_size=512).resolved().steps_per_epoch == 117  # partial last batch dropped


# ------------------------------------------------------------------ validation messages
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(recipe="quick"), "--recipe 'quick' is unknown; choose one of tutorial, fast"),
        (dict(model="resnet"), "--model 'resnet' is unknown; choose one of mlp, cnn"),
        (dict(epochs=0), "--epochs must be a positive number, got 0"),
        (dict(epochs=-1), "--epochs must be a positive number, got -1"),
        (dict(batch_size=0), "--batch-size must be a positive number"),
        (dict(lr=0.0), "--lr must be a positive number"),
        (dict(lr=-0.1), "--lr must be a positive number"),
        (dict(momentum=1.0), "--momentum must be in [0, 1)"),
        (dict(label_smoothing=-0.1), "--label-smoothing must be in [0, 1)"),
        (dict(weight_decay=-1.0), "--weight-decay must be >= 0"),
        (dict(precision="fp8"), "--precision 'fp8' is not valid; choose one of auto, fp32, bf16, fp16"),
        (dict(optimizer="lamb"), "--optimizer 'lamb' is not valid"),
        (dict(backend="mpi"), "--backend 'mpi' is not valid; choose one of auto, gloo, nccl"),
        (dict(device="tpu"), "--device 'tpu' is not valid"),
        (dict(batch_size=70_000), "--batch-size 70000 is larger than the 60,000 training images"),
        (dict(batch_size=100, grad_accum=3), "--batch-size 100 is not divisible by --grad-accum 3"),
        (dict(max_steps=0), "--max-steps must be a positive number"),
        (dict(expected_world_size=0), "--expected-world-size must be a positive number"),
        (dict(target_accuracy=101.0), "--target-accuracy is a percentage in (0, 100]"),
        (dict(checkpoint_every=-1), "--checkpoint-every must be >= 0"),
        (dict(wandb_mode="sometimes"), "--wandb-mode 'sometimes' is not valid"),
        (dict(cuda_graph="yes"), "--cuda-graph 'yes' is not valid; choose one of auto, on, off"),
        (dict(requeue_signal="HUP"), "--requeue-signal 'HUP' is not valid; choose one of USR1, USR2"),
        (dict(normalize="zscore"), "--normalize 'zscore' is not valid; choose one of unit, standard"),
    ],
)
def test_validation_messages(fields, message):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**fields).resolved()
    assert message in str(error.value)


# ------------------------------------------------------------------ every number has a range
@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--seed", "99999999999999999999", "--seed must be an integer from 0 to 4,294,967,295"),
        ("--seed", "-1", "--seed must be an integer from 0 to 4,294,967,295, got -1"),
        ("--log-every", "1000000000000", "--log-every must be an integer from 1 to 1,000,000"),
        ("--timeout-s", "1e300", "--timeout-s must be a number from 0 to 10,000,000, got 1e+300"),
        ("--bucket-cap-mb", "1e300", "--bucket-cap-mb must be a number from 0 to 1,000,000"),
        ("--keep-checkpoints", "10000000000", "--keep-checkpoints must be an integer from 1 to 1,000,000"),
        ("--powersgd-rank", "100000", "--powersgd-rank must be an integer from 1 to 10,000"),
        ("--num-workers", "100000", "--num-workers must be an integer from 0 to 256"),
        ("--grad-clip", "inf", "--grad-clip must be >= 0, got inf"),
        ("--profile", "1000000000", "--profile must be an integer from 0 to 1,000,000"),
        ("--peak-tflops", "nan", "--peak-tflops must be a positive number, got nan"),
        ("--stop-check-every", "1e9", "invalid int value"),
    ],
)
def test_absurd_numbers_end_in_one_line_before_any_work(flag, value, message, capsys):
    """Each of these crashed a run (an int64 overflow, a 4 TB allocation, a timedelta overflow) or passed
    silently; now the config says which flag, its range and the value."""
    with pytest.raises((ConfigError, SystemExit)) as error:
        parse(flag, value).resolved()
    assert message in (str(error.value) + capsys.readouterr().err)


def test_every_number_of_the_config_has_a_range():
    hints = typing.get_type_hints(TrainConfig)
    numbers = {name for name, hint in hints.items() if {int, float} & {hint, *typing.get_args(hint)}}
    assert numbers == set(RANGES), "a number without a range (or a range without a number)"


def test_a_config_file_with_an_absurd_number_is_refused(tmp_path):
    (tmp_path / "c.toml").write_text("log_every = 1000000000000\n")
    with pytest.raises(ConfigError, match="--log-every must be an integer from 1 to 1,000,000"):
        parse("--config", str(tmp_path / "c.toml")).resolved()


@pytest.mark.parametrize(
    "argv",
    [
        ("evaluate", "runs/x", "--timeout-s", "nan"),
        ("bench", "--seed", "-3"),
        ("bench", "--repeat", "0"),
        ("scale", "--bench-steps", "0"),
        ("scale", "--link-gbps", "inf"),
    ],
)
def test_other_commands_check_their_numbers_when_parsing(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(list(argv))
    assert stop.value.code == 2
    assert f"argument {argv[-2]}: must be " in capsys.readouterr().err


def test_batch_must_split_over_the_ranks():
    cfg = TrainConfig(recipe="tutorial", batch_size=101).resolved()
    with pytest.raises(ConfigError) as error:
        cfg.check_world_size(2)
    assert "--batch-size 101 is the GLOBAL batch and must be divisible by world size 2" in str(error.value)
    assert "e.g. --batch-size 102" in str(error.value)
    cfg.check_world_size(1)
    TrainConfig(recipe="tutorial", batch_size=120).resolved().check_world_size(3)
    accum = TrainConfig(recipe="tutorial", batch_size=100, grad_accum=4).resolved()
    with pytest.raises(ConfigError, match="world size 3 x grad-accum 4 = 12"):
        accum.check_world_size(3)


def test_expected_world_size():
    cfg = TrainConfig(recipe="tutorial", expected_world_size=4).resolved()
    cfg.check_world_size(4)
    with pytest.raises(ConfigError, match=r"started 2 process\(es\) but --expected-world-size is 4"):
        cfg.check_world_size(2)


# ------------------------------------------------------------------ device and backend choice
def test_more_local_ranks_than_gpus(monkeypatch):
    """Needs GPUs to happen for real; here torch is told it sees 2 and local rank 2 asks for a third."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("must fail before set_device"))
    env = DistEnv(rank=2, local_rank=2, world_size=3, local_world_size=3, launcher="torchrun")
    with pytest.raises(
        ConfigError,
        match=r"local rank 2 needs GPU 2 but only 2 GPU\(s\) are visible.*"
        r"start at most 2 processes per node",
    ):
        pick_device("auto", env)


@pytest.mark.parametrize("local_rank", [0, 1, 3])
def test_a_rank_that_sees_one_gpu_uses_cuda_0(monkeypatch, local_rank):
    """SLURM --gpus-per-task and per-rank CUDA_VISIBLE_DEVICES show each rank ONE GPU: it is cuda:0, whatever
    the local rank (the old rule asked for GPU <local rank> and failed on every rank but the first)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    env = DistEnv(rank=local_rank, local_rank=local_rank, world_size=4, local_world_size=4, launcher="torchrun")
    assert pick_device("auto", env) == torch.device("cuda", 0) and chosen == [0]
    assert gpu_index(DistEnv(local_rank=2, world_size=4, local_world_size=4), 4) == 2  # several: the local rank's


def test_two_nccl_ranks_on_one_gpu_is_a_clear_error(monkeypatch):
    assert shared_gpus({0: "a/GPU-1", 1: "a/GPU-1", 2: "a/GPU-2", 3: "b/GPU-1"}) == [[0, 1]]
    assert shared_gpus({0: "a/GPU-1", 1: "a/GPU-2"}) == []

    class Store:  # the launcher's store, as check_nccl_gpus uses it (every rank has published its GPU)
        values = {"p/gpu-0": b"host/GPU-1", "p/gpu-1": b"host/GPU-1"}
        set = staticmethod(lambda key, value: None)
        wait = staticmethod(lambda keys, timeout: None)
        get = staticmethod(lambda key: Store.values[key])

    monkeypatch.setattr(process_group, "gpu_identity", lambda device: "host/GPU-1")
    env = DistEnv(rank=0, world_size=2, local_world_size=2, launcher="torchrun")
    with pytest.raises(
        ConfigError,
        match=r"NCCL cannot run two ranks on one GPU \(ranks 0, 1 on host/GPU-1\); "
        r"use --backend gloo",
    ):
        process_group.check_nccl_gpus(Store, env, torch.device("cuda", 0), "p/", 5.0)


def test_device_and_backend_on_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", DistEnv()) == torch.device("cpu")
    assert pick_device("cpu", DistEnv()) == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda was asked for but no CUDA GPU is visible"):
        pick_device("cuda", DistEnv())
    assert pick_backend("auto", torch.device("cpu")) == "gloo"
    assert pick_backend("auto", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ConfigError, match="--backend nccl needs a CUDA GPU"):
        pick_backend("nccl", torch.device("cpu"))


def test_launcher_environment_is_read_in_one_place():
    env = DistEnv.from_environ(
        {
            "RANK": "3",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "1234",
            "TORCHELASTIC_RESTART_COUNT": "1",
        }
    )
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert (env.master_addr, env.master_port, env.launcher, env.restart_count) == ("10.0.0.1", 1234, "torchrun", 1)
    assert DistEnv.from_environ({}) == DistEnv()
    with pytest.raises(ConfigError, match="RANK='x' is not an integer"):
        DistEnv.from_environ({"RANK": "x", "WORLD_SIZE": "2"})
    assert slurm_port("12345") == 20000 + 12345 % 20000


def test_a_node_is_named_as_slurm_names_it_else_by_its_host_name():
    """`sbatch --exclude` takes SLURM's node names, which need not be the host names."""
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "MASTER_ADDR": "n1", "SLURMD_NODENAME": "gpu07"}
    assert DistEnv.from_environ(srun).node == "gpu07"
    assert DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "1", "SLURMD_NODENAME": "gpu08"}).node == "gpu08"
    assert DistEnv.from_environ({}).node == socket.gethostname()

"""Where a run goes and where its settings come from: default run folders (runs/<date>-<time>-<model>-<recipe>,
runs/latest), `--resume [RUN]` reading the run's config.json, and `--config FILE` (TOML or JSON).

The unit tests call run_dir.place_run and config_sources.compose_config directly; the rest start real
processes in a fresh current folder (where runs/ goes) and compare parameters exactly (plain SGD: a resumed
run continues the same trajectory bit for bit, docs/design.md, Checkpoint contents).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path

import pytest
from conftest import base_env, ddp_mnist, final_model, max_param_diff, parse, results, run_cmd

from ddp_mnist.artifacts.run_dir import place_run
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.errors import ConfigError
from ddp_mnist.files import write_json_atomic

NOW = datetime(2026, 11, 30, 2, 15, 3)
STEPS = 10
TINY = ("--recipe", "tutorial", "--max-steps", str(STEPS), "--checkpoint-every", "5")  # plain SGD, batch 100


# ------------------------------------------------------------------------------------------------
# Naming: a new folder per start, the same one for a restart of the job
# ------------------------------------------------------------------------------------------------
def test_runs_started_in_the_same_second_get_distinct_folders_and_latest_follows(tmp_path):
    root = tmp_path / "runs"
    names = [place_run("mlp", "fast", {}, False, root=root, now=NOW) for _ in range(3)]
    assert [Path(n).name for n in names] == [
        "20261130-021503-mlp-fast",
        "20261130-021503-mlp-fast-2",
        "20261130-021503-mlp-fast-3",
    ]
    assert all(Path(n).is_dir() for n in names)
    assert os.readlink(root / "latest") == "20261130-021503-mlp-fast-3"  # relative: runs/ can move
    assert not list(root.glob(".latest-*"))  # the temporary link was renamed into place


def folder_of(root: Path, name: str, job_ids: dict[str, str]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    write_json_atomic(folder / "job.json", job_ids)
    return folder


def test_a_restart_returns_to_its_jobs_folder_a_new_start_never_does(tmp_path):
    root = tmp_path / "runs"
    mine = folder_of(root, "20261130-010000-mlp-fast", {"slurm_job_id": "7", "torchrun_run_id": "abc"})
    folder_of(root, "20261130-020000-mlp-fast", {"slurm_job_id": "8"})  # newer, another job
    # A requeue (SLURM job 7) and an elastic restart (torchrun id abc): the folder whose job.json names them.
    assert place_run("mlp", "fast", {"slurm_job_id": "7"}, True, root=root, now=NOW) == str(mine)
    assert place_run("mlp", "fast", {"torchrun_run_id": "abc"}, True, root=root, now=NOW) == str(mine)
    # A first start that reuses an id (torchrun's multi-node script defaults to `ddp-mnist`): a new folder.
    fresh = place_run("mlp", "fast", {"torchrun_run_id": "abc"}, False, root=root, now=NOW)
    assert Path(fresh).name == "20261130-021503-mlp-fast"
    # A restart of a job whose first start never wrote job.json (it died first): a new folder too.
    assert Path(place_run("mlp", "fast", {"slurm_job_id": "9"}, True, root=root, now=NOW)).name.endswith("fast-2")


def test_a_restart_without_job_ids_returns_to_the_newest_run(tmp_path):
    """torchrun without --standalone or --rdzv-id names no job: the restart takes runs/latest, as before."""
    root = tmp_path / "runs"
    first = place_run("cnn", "tutorial", {}, False, root=root, now=NOW)
    assert place_run("cnn", "tutorial", {}, True, root=root, now=NOW) == str(first)


def test_latest_left_by_an_older_version_as_a_folder_is_kept(tmp_path, caplog):
    root = tmp_path / "runs"
    (root / "latest").mkdir(parents=True)
    (root / "latest" / "results.json").write_text("{}")
    folder = place_run("mlp", "fast", {}, False, root=root, now=NOW)
    assert Path(folder).is_dir() and (root / "latest" / "results.json").exists()
    assert "could not point" in caplog.text and not list(root.glob(".latest-*"))


# ------------------------------------------------------------------------------------------------
# --config FILE
# ------------------------------------------------------------------------------------------------
def test_config_file_toml_and_json_and_flags_override_it(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_text('recipe = "tutorial"\nlr = 1\nbatch-size = 200\nwandb_tags = ["x", "y"]\n')  # 1: a float's int
    cfg = parse("--config", str(toml), "--batch-size", "300")
    assert (cfg.recipe, cfg.lr, cfg.batch_size, cfg.wandb_tags) == ("tutorial", 1, 300, ["x", "y"])
    assert cfg.resolved().epochs == 10  # what neither sets: the recipe's
    js = tmp_path / "a.json"
    js.write_text(json.dumps({"model": "cnn", "epochs": 2, "seed": 3}))
    cfg = parse("--config", str(js), "--seed", "0")  # an explicit 0 wins over the file's 3
    assert (cfg.model, cfg.epochs, cfg.seed) == ("cnn", 2, 0)


def test_a_runs_config_json_is_a_valid_config_file_without_its_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = TrainConfig(
        recipe="tutorial", lr=0.05, run_dir="runs/old", resume=True, pause_at_step=4, expected_world_size=2, max_steps=7
    ).resolved()
    saved.save(tmp_path / "config.json")
    cfg = parse("--config", str(tmp_path / "config.json"))
    assert (cfg.lr, cfg.max_steps, cfg.epochs) == (0.05, 7, 10)
    # Where it ran, whether it resumed, and what described that launch only are not taken over.
    assert (cfg.run_dir, cfg.resume, cfg.pause_at_step, cfg.expected_world_size) == (None, False, None, None)


@pytest.mark.parametrize(
    "text, message",
    [
        ("epoch = 3\n", "unknown setting(s) 'epoch' (did you mean 'epochs'?)"),
        ("learning_rate = 0.1\n", "unknown setting(s) 'learning_rate'; `ddp-mnist train --help` lists them"),
        ("bach_size = 10\n", "'bach_size' (did you mean 'batch_size'?)"),
        ('epochs = "3"\n', "epochs = '3' is not a int"),
        ("lr = true\n", "lr = True is not a float"),
        ("lr = \n", "is not valid TOML"),
    ],
)
def test_a_bad_config_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        parse("--config", str(path))
    assert message in str(error.value) and str(path) in str(error.value)


def test_config_file_must_be_toml_or_json(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1\n")
    with pytest.raises(ConfigError, match="name a .toml or a .json file"):
        parse("--config", str(tmp_path / "c.yaml"))


# ------------------------------------------------------------------------------------------------
# --resume: the run's config.json, and what flags may change
# ------------------------------------------------------------------------------------------------
def saved_run(folder: Path, **settings) -> Path:
    folder.mkdir(parents=True)
    TrainConfig(run_dir=str(folder), **settings).resolved().save(folder / "config.json")
    return folder


def test_resume_alone_reads_runs_latest_and_no_flag_needs_retyping(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = Path(place_run("mlp", "tutorial", {}, False, now=NOW))
    TrainConfig(recipe="tutorial", lr=0.05, batch_size=120, max_steps=10, run_dir=str(folder)).save(
        folder / "config.json"
    )
    cfg = parse("--resume", "--max-steps", "20", "--lr", "0.05")  # repeating a value is fine
    assert (cfg.run_dir, cfg.resume, cfg.lr, cfg.batch_size, cfg.max_steps) == (str(folder), True, 0.05, 120, 20)
    # The folder, a checkpoint in it, or the link to it name the same run (the link is followed once).
    assert parse("--resume", str(folder)).run_dir == str(folder)
    assert parse("--resume", "runs/latest").run_dir == str(folder)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "step-00000005.pt").write_bytes(b"")
    assert parse("--resume", str(folder / "checkpoints" / "step-00000005.pt")).run_dir == str(folder)


def test_resume_reads_a_config_json_written_before_a_key_was_renamed(tmp_path):
    """Runs started before --compile became --cuda-graph keep their `compile` key in config.json."""
    folder = saved_run(tmp_path / "old", recipe="tutorial", max_steps=10)
    settings = json.loads((folder / "config.json").read_text())
    settings["compile"] = settings.pop("cuda_graph")
    settings["compile"] = "off"
    (folder / "config.json").write_text(json.dumps(settings))
    cfg = parse("--resume", str(folder), "--max-steps", "20")
    assert (cfg.cuda_graph, cfg.max_steps) == ("off", 20)


def test_resume_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="there is no runs/latest"):
        parse("--resume")
    with pytest.raises(ConfigError, match="not a run folder"):
        parse("--resume", str(tmp_path / "nowhere"))
    folder = saved_run(tmp_path / "a")
    with pytest.raises(ConfigError, match="name different runs"):
        parse("--resume", str(folder), "--run-dir", str(tmp_path / "b"))
    # --resume --run-dir DIR keeps today's rule: a folder without a job starts from the beginning.
    assert parse("--resume", "--run-dir", str(tmp_path / "new")).run_dir == str(tmp_path / "new")


@pytest.mark.parametrize(
    "flags, named",
    [
        (("--lr", "0.1"), "lr: 0.003 in the run, 0.1 now"),
        (("--seed", "1", "--batch-size", "256"), "batch_size: 512 in the run, 256 now; seed: 0 in the run, 1 now"),
        (("--model", "cnn"), "model: 'mlp' in the run, 'cnn' now"),
    ],
)
def test_resume_refuses_a_trajectory_change_naming_keys_and_values(tmp_path, flags, named):
    folder = saved_run(tmp_path / "run")  # fast recipe: lr 0.003, batch 512
    with pytest.raises(ConfigError) as error:
        parse("--resume", str(folder), *flags)
    assert named in str(error.value) and "start a new run" in str(error.value)


def test_resume_refuses_a_trajectory_change_from_a_config_file_too(tmp_path):
    folder = saved_run(tmp_path / "run")
    (tmp_path / "c.toml").write_text("momentum = 0.9\n")
    with pytest.raises(ConfigError, match=r"momentum: 0\.0 in the run, 0\.9 now"):
        parse("--resume", str(folder), "--config", str(tmp_path / "c.toml"))


def test_resume_may_change_what_does_not_alter_the_trajectory(tmp_path):
    folder = saved_run(tmp_path / "run", max_steps=5)
    cfg = parse(
        "--resume",
        str(folder),
        "--max-steps",
        "50",
        "--checkpoint-every",
        "7",
        "--keep-checkpoints",
        "9",
        "--eval-every",
        "2",
        "--data-dir",
        "elsewhere",
        "--no-progress",
        "--timeout-s",
        "9",
        "--wandb",
    )
    assert (
        cfg.max_steps,
        cfg.checkpoint_every,
        cfg.keep_checkpoints,
        cfg.eval_every,
        cfg.data_dir,
        cfg.progress,
        cfg.timeout_s,
        cfg.wandb,
    ) == (50, 7, 9, 2, "elsewhere", False, 9.0, True)


def test_more_epochs_only_under_a_constant_schedule(tmp_path):
    constant = saved_run(tmp_path / "constant", recipe="tutorial")  # 10 epochs, constant
    assert parse("--resume", str(constant), "--epochs", "12").epochs == 12
    with pytest.raises(ConfigError, match=r"epochs: 10 in the run, 8 now \(fewer epochs"):
        parse("--resume", str(constant), "--epochs", "8")
    onecycle = saved_run(tmp_path / "onecycle")  # fast recipe: 6 epochs, onecycle
    with pytest.raises(
        ConfigError,
        match=r"epochs: 6 in the run, 7 now \(the onecycle schedule spans the run's "
        r"6 epochs and its learning rate already decays",
    ):
        parse("--resume", str(onecycle), "--epochs", "7")


# ------------------------------------------------------------------------------------------------
# Real runs in a fresh current folder
# ------------------------------------------------------------------------------------------------
def in_folder(cwd: Path, cmd: list[str], data_dir: Path, check: bool = True, **env: str):
    return run_cmd(cmd, base_env(data_dir, **env), cwd=cwd, check=check)


def train_in(cwd: Path, *args: str, data_dir: Path, check: bool = True, **env: str):
    """`ddp-mnist train ARGS` on one rank, started in folder CWD (no --run-dir: the default folder)."""
    return ddp_mnist(1, "train", "--no-progress", *args, env=base_env(data_dir, **env), cwd=cwd, check=check)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_dir) -> Path:
    """`ddp-mnist train` twice in a row in one folder, without --run-dir: the folder is returned."""
    cwd = tmp_path_factory.mktemp("cwd")
    for _ in range(2):
        train_in(cwd, *TINY, data_dir=data_dir)
    return cwd


def run_folders(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "runs").iterdir() if not p.is_symlink())


@pytest.mark.process
def test_two_trains_in_a_row_just_work(two_runs):
    first, second = run_folders(two_runs)
    assert first != second and results(first)["steps"] == results(second)["steps"] == STEPS
    assert (two_runs / "runs" / "latest").resolve() == second.resolve()
    assert json.loads((second / "config.json").read_text())["run_dir"] == f"runs/{second.name}"


@pytest.mark.process
def test_resume_of_a_finished_run_says_so_and_exits_0(two_runs, data_dir):
    newest = run_folders(two_runs)[-1]
    before = (newest / "results.json").read_bytes()
    out = train_in(two_runs, "--resume", data_dir=data_dir)
    assert f"run runs/{newest.name} has already finished: {STEPS} steps" in out.stdout
    assert (newest / "results.json").read_bytes() == before


@pytest.mark.process
def test_resume_naming_only_the_folder_continues_the_same_trajectory(two_runs, tmp_path, data_dir):
    """Killed after step 7 (checkpoint at 5), then `--resume RUN` alone: it ends where an uninterrupted run ends."""
    killed = train_in(tmp_path, *TINY, data_dir=data_dir, check=False, DDP_MNIST_FAULT="kill:step=7")
    assert killed.returncode != 0
    (run,) = run_folders(tmp_path)
    out = train_in(tmp_path, "--resume", str(run), data_dir=data_dir)
    assert f"resumed from {run}/checkpoints/step-00000005.pt" in out.stdout, out.stdout
    assert results(run)["steps"] == STEPS
    assert max_param_diff(final_model(run), final_model(run_folders(two_runs)[-1])) == 0.0


@pytest.mark.process
def test_more_epochs_under_a_constant_schedule_train_on(tmp_path, data_dir):
    """3 steps of a 1-epoch run, then `--resume --epochs 2 --max-steps 5`: the checkpoint (written for 1 epoch)
    is accepted by the same rule as config.json, and the run trains on."""
    train_in(tmp_path, "--recipe", "tutorial", "--epochs", "1", "--max-steps", "3", data_dir=data_dir)
    out = train_in(tmp_path, "--resume", "--epochs", "2", "--max-steps", "5", data_dir=data_dir)
    (run,) = run_folders(tmp_path)
    assert "checkpoints/step-00000003.pt" in out.stdout and "2 epochs of 600 steps" in out.stdout, out.stdout
    assert (results(run)["steps"], results(run)["epochs"]) == (5, 2)


@pytest.mark.process
def test_an_elastic_restart_returns_to_the_same_default_folder(tmp_path, data_dir):
    """torchrun --standalone names the job (a rendezvous id): a worker killed after step 7 restarts the job,
    which finds its folder (job.json) and resumes there instead of starting a new one."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "-m",
        "ddp_mnist",
        "train",
        "--no-progress",
        *TINY,
    ]
    out = in_folder(tmp_path, cmd, data_dir, DDP_MNIST_FAULT="kill:step=7:rank=1")
    (run,) = run_folders(tmp_path)
    assert "resumed from" in out.stdout and results(run)["steps"] == STEPS
    assert results(run)["restarts"] >= 1


def test_no_resume_is_the_default_spelled_out():
    assert parse("--no-resume").resume is False and parse().resume is False


def test_a_resume_trims_the_step_lines_past_its_checkpoint(tmp_path):
    """steps.jsonl (a line every --log-every steps): a job resumed from step 40 logs steps 60, ... again, so the
    lines past 40 go, and so does a last line cut by a crash; the others stay as they were."""
    from ddp_mnist.artifacts.run_dir import RunDir

    run = RunDir(tmp_path)
    for step in (20, 40, 60):
        run.append_step({"global_step": step, "loss": 1.0})
    with open(run.steps, "a") as f:
        f.write('{"global_step": 8')  # cut short
    run.trim_steps(40)
    assert [json.loads(line)["global_step"] for line in run.steps.read_text().splitlines()] == [20, 40]
    RunDir(tmp_path / "none").trim_steps(40)  # no file yet: nothing to do

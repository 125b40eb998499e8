"""Using a trained model: evaluate (accuracy, loss, confusion matrix, eval.json), export (safetensors), predict
(PNG and JPEG files) and report (the curves as a PNG).

Every test reads ONE short trained run (mlp, fast recipe, 2 epochs of 100 steps: about 97% on the test set),
reached through the `runs/latest` symlink that training makes.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import base_env, ddp_mnist, results
from safetensors.torch import load_file
from torchvision.io import decode_image, write_jpeg, write_png

from ddp_mnist import __version__
from ddp_mnist.artifacts.trained import load_trained
from ddp_mnist.commands.cli import main
from ddp_mnist.commands.predict import read_digit
from ddp_mnist.commands.report import HEIGHT, WIDTH
from ddp_mnist.data.batches import load_split
from ddp_mnist.training.evaluation import format_accuracy, format_confusion

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; predict uses them until that is needed.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

STEPS = 200  # 2 epochs of 60,000 / 600


class Run(NamedTuple):
    link: Path  # what the tests pass: a symlink to the run folder, like runs/latest
    folder: Path  # the run folder itself
    log: str  # training's console output

    @property
    def final_checkpoint(self) -> Path:
        return self.folder / "checkpoints" / f"step-{STEPS:08d}.pt"


@pytest.fixture(scope="session")
def run(tmp_path_factory, data_dir) -> Run:
    """Started without --run-dir: the package makes runs/<date>-<time>-mlp-fast and links runs/latest to it."""
    root = tmp_path_factory.mktemp("use")
    args = ("--no-progress", "--model", "mlp", "--recipe", "fast", "--epochs", "2", "--batch-size", "600")
    proc = ddp_mnist(1, "train", *args, env=base_env(data_dir), cwd=root)
    link = root / "runs" / "latest"
    assert link.is_symlink()
    return Run(link, link.resolve(), proc.stdout)


@pytest.fixture(scope="session")
def test_set(data_dir):
    return load_split(Path(data_dir), train=False)


@pytest.fixture(scope="session")
def evaluated(run, data_dir):
    """`ddp-mnist evaluate` of the run folder at 1 rank: its console output and RUN/eval.json."""
    proc = ddp_mnist(1, "evaluate", str(run.link), env=base_env(data_dir))
    return proc.stdout, json.loads((run.folder / "eval.json").read_text())


@pytest.fixture(scope="session")
def exported(run, data_dir) -> Path:
    """`ddp-mnist export` of the run folder: RUN/model.safetensors beside RUN/model.json."""
    proc = ddp_mnist(1, "export", str(run.link), env=base_env(data_dir))
    assert f"-> {run.folder / 'model.safetensors'}, {run.folder / 'model.json'}" in proc.stdout
    return run.folder / "model.safetensors"


# ------------------------------------------------------------------------------------------ evaluate
@pytest.mark.process
def test_evaluate_prints_and_saves_accuracy_loss_and_confusion_matrix(run, evaluated, test_set):
    stdout, saved = evaluated
    trained = results(run.folder)
    assert saved["checkpoint"] == str(run.final_checkpoint) and saved["global_step"] == STEPS
    # The final checkpoint holds the weights results.json scored: the same count, the same number.
    assert saved["test_correct"] == trained["test_correct"] and saved["test_accuracy"] == trained["test_accuracy"]
    assert saved["test_samples"] == 10_000 and math.isclose(saved["test_loss"], trained["test_loss"], rel_tol=1e-9)
    confusion = saved["confusion_matrix"]
    assert [sum(row) for row in confusion] == torch.bincount(test_set.labels, minlength=10).tolist()  # rows: true
    assert sum(confusion[d][d] for d in range(10)) == saved["test_correct"]
    assert 0 < saved["test_correct"] < 10_000 and any(confusion[t][p] for t in range(10) for p in range(10) if t != p)
    # One formatter: training's log, evaluate's line and the numbers agree.
    accuracy = format_accuracy(trained["test_accuracy"])
    assert f"done: test accuracy {accuracy}," in run.log
    assert f"test accuracy {accuracy} ({saved['test_correct']}/10000), loss {saved['test_loss']:.4f}" in stdout
    assert format_confusion(confusion) in stdout and f"-> {run.folder / 'eval.json'}" in stdout


def test_format_accuracy_writes_a_percentage_with_two_decimals():
    assert format_accuracy(98.516) == "98.52%" and format_accuracy(100.0) == "100.00%"


@pytest.mark.process
def test_evaluate_at_2_ranks_counts_the_same_confusion_matrix(run, evaluated, tmp_path, data_dir):
    _, one_rank = evaluated
    out = tmp_path / "eval-2.json"
    ddp_mnist(2, "evaluate", str(run.link), "--out", str(out), env=base_env(data_dir))
    two_ranks = json.loads(out.read_text())
    assert two_ranks["world_size"] == 2 and two_ranks["checkpoint"] == one_rank["checkpoint"]
    assert two_ranks["confusion_matrix"] == one_rank["confusion_matrix"]  # counted exactly, each image once
    assert two_ranks["test_accuracy"] == one_rank["test_accuracy"]
    assert math.isclose(two_ranks["test_loss"], one_rank["test_loss"], rel_tol=1e-6)  # a sum in another order


# ------------------------------------------------------------------------------------------ export
@pytest.mark.process
def test_export_gives_exactly_the_checkpoints_predictions(run, exported, test_set):
    settings = json.loads(exported.with_suffix(".json").read_text())
    trained = results(run.folder)
    assert settings == {
        "model": "mlp",
        "normalize": "standard",
        "precision": "auto",
        "input_shape": [1, 28, 28],
        "classes": list(range(10)),
        "source_checkpoint": str(run.final_checkpoint),
        "global_step": STEPS,
        "test_accuracy": trained["test_accuracy"],
        "ddp_mnist_version": __version__,
    }
    from_checkpoint, from_export = load_trained(run.final_checkpoint), load_trained(exported)
    assert from_export.settings == from_checkpoint.settings
    images = test_set.images[:2000]
    assert torch.equal(from_export.logits(images), from_checkpoint.logits(images))


@pytest.mark.process
def test_export_best_into_another_folder(run, tmp_path, data_dir):
    out = tmp_path / "best-export"
    ddp_mnist(1, "export", str(run.link), "--best", "--out", str(out), env=base_env(data_dir))
    best = json.loads((run.folder / "checkpoints" / "best.json").read_text())
    settings = json.loads((out / "model.json").read_text())
    assert settings["source_checkpoint"] == str(run.folder / "checkpoints" / "best.pt")
    assert settings["global_step"] == best["global_step"] and settings["test_accuracy"] == best["test_accuracy"]
    weights = torch.load(run.folder / "checkpoints" / "best.pt", weights_only=True)["model"]
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)


def test_export_best_of_a_run_without_best_pt_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "config.json").write_text("{}")
    assert main(["export", str(tmp_path), "--best"]) == 2
    assert f"ddp-mnist: error: {tmp_path / 'checkpoints'} holds no best.pt" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_a_run_folder_whose_config_json_is_broken_is_a_clear_error(command, tmp_path, capsys):
    """A run's config.json is read as `--resume` reads it: one line naming the file, status 2."""
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "config.json").write_text('{"model": "mlp",')  # cut short
    assert main([command, str(tmp_path)]) == 2
    assert f"ddp-mnist: error: config file {tmp_path / 'config.json'} is not valid JSON: " in capsys.readouterr().err


def correctly_classified(run: Run, test_set, count: int) -> list[int]:
    """Test images the model gets right, confidently (their label must survive JPEG and resizing)."""
    probabilities = torch.softmax(load_trained(run.final_checkpoint).logits(test_set.images[:500]), dim=1)
    confident = (probabilities.argmax(1) == test_set.labels[:500]) & (probabilities.max(1).values > 0.8)
    return confident.nonzero().flatten()[:count].tolist()


def predictions(stdout: str) -> dict[str, tuple[int, float]]:
    lines = [line.split("\t") for line in stdout.splitlines()]
    return {name: (int(digit), float(probability)) for name, digit, probability in lines}


@pytest.mark.process
def test_predict_gives_back_the_labels_of_png_and_jpeg_files(run, exported, test_set, tmp_path, data_dir, capsys):
    picked = correctly_classified(run, test_set, 10)
    files = {}
    for n, i in enumerate(picked):
        image = test_set.images[i][None]  # [1, 28, 28] uint8: white digit on black
        path = tmp_path / f"{i}.png" if n else tmp_path / f"{i}.jpg"
        (write_png if n else write_jpeg)(image, str(path))
        files[str(path)] = test_set.labels[i].item()
    assert torch.equal(read_digit(tmp_path / f"{picked[1]}.png"), test_set.images[picked[1]])  # MNIST as it was
    from_checkpoint = ddp_mnist(1, "predict", str(run.link), *files, env=base_env(data_dir)).stdout
    found = predictions(from_checkpoint)
    assert {name: digit for name, (digit, _) in found.items()} == files
    assert all(0.5 < probability <= 1.0 for _, probability in found.values())
    assert main(["predict", str(exported), *files]) == 0  # the export, in this process (saves a start-up)
    from_export = predictions(capsys.readouterr().out)
    assert from_export.keys() == found.keys()
    for name, (digit, probability) in from_export.items():  # (this process may use other CPU threads)
        assert digit == found[name][0] and math.isclose(probability, found[name][1], abs_tol=2e-4)


@pytest.mark.process
def test_the_readmes_sample_digits_come_back(exported, capsys):
    """README's quick start predicts docs/digits/*.png (one test image per digit, named after its label)."""
    digits = sorted((Path(__file__).parent.parent / "docs" / "digits").glob("*.png"))
    assert [p.stem for p in digits] == [str(d) for d in range(10)]
    assert main(["predict", str(exported), *map(str, digits)]) == 0
    found = predictions(capsys.readouterr().out)
    assert {Path(name).stem: digit for name, (digit, _) in found.items()} == {str(d): d for d in range(10)}


@pytest.mark.process
def test_predict_inverts_and_resizes_a_larger_black_on_white_rgb_image(run, exported, test_set, tmp_path, capsys):
    i = correctly_classified(run, test_set, 1)[0]
    ink_on_paper = 255 - test_set.images[i].repeat_interleave(3, 0).repeat_interleave(3, 1)  # 84x84
    path = tmp_path / "paper.png"
    write_png(ink_on_paper.expand(3, -1, -1).contiguous(), str(path))  # RGB
    assert read_digit(path, invert=True).shape == (28, 28)
    assert main(["predict", "--invert", str(exported), str(path)]) == 0
    assert predictions(capsys.readouterr().out)[str(path)][0] == test_set.labels[i].item()
    assert main(["predict", str(exported), str(path)]) == 0
    assert f"{path} looks like a dark digit on a light background" in capsys.readouterr().err


@pytest.mark.process
def test_predict_names_a_missing_or_unreadable_image_and_a_wrong_model(run, exported, tmp_path, capsys, test_set):
    image = tmp_path / "digit.png"
    write_png(test_set.images[0][None], str(image))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.touch()
    lone = tmp_path / "lone.safetensors"  # an export without its JSON
    lone.write_bytes(exported.read_bytes())
    mislabelled = tmp_path / "cnn.safetensors"  # MLP weights whose JSON says cnn
    mislabelled.write_bytes(exported.read_bytes())
    settings = json.loads(exported.with_suffix(".json").read_text())
    mislabelled.with_suffix(".json").write_text(json.dumps({**settings, "model": "cnn"}))
    cases = [
        ([str(run.link), str(tmp_path / "missing.png")], f"image {tmp_path / 'missing.png'} does not exist"),
        ([str(run.link), str(image), str(not_an_image)], f"image {not_an_image} cannot be decoded"),
        ([str(run.link), str(empty)], f"image {empty} cannot be decoded"),
        ([str(image), str(image)], f"{image} cannot be read as a checkpoint (UnpicklingError)"),
        ([str(lone), str(image)], f"{tmp_path / 'lone.json'} is missing"),
        ([str(mislabelled), str(image)], f"{mislabelled}: the weights do not fit the 'cnn' network"),
        ([str(tmp_path / "nothing"), str(image)], f"{tmp_path / 'nothing'} is neither a checkpoint file nor a run"),
    ]
    for args, message in cases:
        assert main(["predict", *args]) == 2, args
        captured = capsys.readouterr()
        assert f"ddp-mnist: error: {message}" in captured.err and captured.out == ""


@pytest.mark.process
def test_predict_exits_2_on_a_wrong_model_file(tmp_path, test_set, data_dir):
    """The real command: status 2, one line, no traceback."""
    image = tmp_path / "digit.png"
    write_png(test_set.images[0][None], str(image))
    proc = ddp_mnist(1, "predict", str(image), str(image), env=base_env(data_dir), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"ddp-mnist: error: {image} cannot be read as a checkpoint (UnpicklingError); pass a .pt written by "
        f"ddp-mnist, a run folder, or an exported model.safetensors"
    ]


# ------------------------------------------------------------------------------------------ report
@pytest.mark.process
def test_report_draws_the_runs_curves_into_a_png(run, tmp_path, data_dir, capsys):
    proc = ddp_mnist(1, "report", str(run.link), env=base_env(data_dir, MPLBACKEND="", DISPLAY=""))
    png = run.folder / "report.png"
    assert f"-> {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert decode_image(str(png)).shape[1:] == (HEIGHT, WIDTH)
    out = tmp_path / "curves.png"
    assert main(["report", str(run.link), "--out", str(out)]) == 0
    assert decode_image(str(out)).shape[1:] == (HEIGHT, WIDTH)
    capsys.readouterr()
    assert main(["report", str(run.link), "--out", str(tmp_path / "no-such-folder" / "curves.png")]) == 2
    assert f"cannot write {tmp_path / 'no-such-folder' / 'curves.png'} (No such file" in capsys.readouterr().err


def test_report_of_a_run_without_metrics_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["report", str(tmp_path)]) == 2
    assert (
        f"ddp-mnist: error: {tmp_path} has no metrics to draw (metrics.jsonl is missing or empty): it has not "
        f"finished an epoch yet"
    ) in capsys.readouterr().err
    assert not (tmp_path / "report.png").exists()


@pytest.mark.process
def test_reading_commands_work_on_a_read_only_copy_and_change_nothing(run, tmp_path, capsys):
    """The reported case: evaluate, export and predict moved a damaged checkpoint aside, so they failed on a
    read-only copy of a run that holds a good checkpoint. Now they skip it and write nothing into the run
    (export and report need --out there; evaluate prints its result and warns that eval.json was not written)."""
    copy = Path(shutil.copytree(run.folder, tmp_path / "copy", symlinks=True))
    newest = sorted((copy / "checkpoints").glob("step-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:-100])  # damaged: its hash differs
    (tmp_path / "out").mkdir()
    before = {str(p): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)  # read-only (for a user; root's writes are checked below)
    try:
        assert main(["export", str(copy), "--out", str(tmp_path / "out")]) == 0
        assert main(["report", str(copy), "--out", str(tmp_path / "out" / "report.png")]) == 0
        digit = tmp_path / "out" / "digit.png"
        write_png(torch.zeros((1, 28, 28), dtype=torch.uint8), str(digit))
        assert main(["predict", str(copy), str(digit)]) == 0
    finally:
        for path in [copy, *copy.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert {str(p): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before  # nothing moved or written
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "report.png").exists()
    assert "digit.png\t" in capsys.readouterr().out

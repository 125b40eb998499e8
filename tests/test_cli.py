"""The command line: `--help` (groups, choices, defaults, examples; also in an install without .py sources),
the renamed flags, and a package without import cycles."""

from __future__ import annotations

import argparse
import compileall
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, base_env, parse

from ddp_mnist.commands.arguments import fields_by_group
from ddp_mnist.commands.cli import build_parser
from ddp_mnist.commands.cli_docs import subcommands
from ddp_mnist.config.options import GROUPS, recipe_values
from ddp_mnist.config.train_config import TrainConfig


@pytest.mark.process
def test_help_works_in_an_install_without_py_files(tmp_path):
    """Some installs ship only compiled .pyc files; `--help` parsed TrainConfig's source with `ast` and
    broke every command there."""
    package = shutil.copytree(ROOT / "ddp_mnist", tmp_path / "ddp_mnist", ignore=shutil.ignore_patterns("__pycache__"))
    assert compileall.compile_dir(str(package), legacy=True, quiet=1)  # module.pyc beside module.py
    for source in package.rglob("*.py"):
        source.unlink()
    env = base_env(PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "ddp_mnist", "train", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL batch per optimizer step" in proc.stdout  # --batch-size's text, from the field's metadata
    found = subprocess.run(
        [sys.executable, "-c", "import ddp_mnist.config.train_config as c; print(c.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    ).stdout
    assert found.strip().endswith(".pyc")  # the copy without sources really was the one run


# ------------------------------------------------------------------ `--help`: groups, choices, defaults
def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every `ddp-mnist COMMAND` parser, also the commands added later: the table is read, not listed here."""
    return dict(subcommands(build_parser()))


def help_sections(text: str) -> dict[str, str]:
    """`--help` split at its section titles (unindented lines ending in ':')."""
    sections, title = {}, ""
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            title = line[:-1]
        sections[title] = sections.get(title, "") + line + "\n"
    return sections


def option_helps(text: str) -> dict[str, str]:
    """Each option's help text in `--help`, its lines joined: {"--model": "Network: ... (default: mlp)"}."""
    helps: dict[str, str] = {}
    for block in re.findall(r"^  --.*?(?=^  -|^\S|^$)", text, re.M | re.S):
        flag, _, rest = block.strip().partition(" ")
        helps[flag.rstrip(",")] = " ".join(re.sub(r"^(\{[^}]*\}|[A-Z_,.]+|--no-[a-z-]+)\s", "", rest.strip()).split())
    return helps


def test_train_help_lists_every_flag_in_its_config_group(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = subcommand_parsers()["train"].format_help()
    titles = [t for t in help_sections(text) if t in GROUPS]
    assert titles == list(GROUPS)  # all eight groups, in the config's order
    sections = help_sections(text)
    for title, fields in fields_by_group().items():
        flags = set(re.findall(r"^  (--[a-z-]+)", sections[title], re.M))
        assert flags >= {"--" + f.name.replace("_", "-") for f in fields}, title
    assert "--cuda-graph" in sections["precision and speed"] and "--pause-at-step" in sections["advanced"]


def test_help_shows_choices_and_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = subcommand_parsers()["train"].format_help()
    assert "--model {mlp,cnn}" in text and "--cuda-graph {auto,on,off}" in text
    assert "--requeue-signal {USR1,USR2}" in text and "--wandb-mode {online,offline,disabled}" in text
    line = option_helps(text)
    assert line["--model"].endswith("(default: mlp)")
    assert line["--keep-checkpoints"].endswith("(default: 3)")
    assert line["--data-dir"].endswith(
        "(default: $DDP_MNIST_DATA, else ./data when it holds MNIST, else the copy shipped inside the package)"
    )
    # Exactly the values a recipe fills in say "default: recipe".
    says_recipe = {flag for flag, help in line.items() if help.endswith("(default: recipe)")}
    assert says_recipe == {"--" + k.replace("_", "-") for k in recipe_values("fast", "mlp")}
    scale = subcommand_parsers()["scale"].format_help()
    assert "--mode {strong,weak}" in scale and "(default: strong)" in scale and "(default: 1,2)" in scale


def test_every_train_flag_names_its_default():
    train = subcommand_parsers()["train"]
    for action in train._actions:
        if action.option_strings and action.dest not in ("help",) and "deprecated" not in action.help:
            assert "(default: " in action.help, action.option_strings


def test_no_help_says_none(monkeypatch):
    """An option without a value says what happens instead ("default: recipe", "$DDP_MNIST_DATA, else ..."),
    in every command's help, also the commands added after this test."""
    monkeypatch.setenv("COLUMNS", "80")
    parsers = {"ddp-mnist": build_parser(), **subcommand_parsers()}
    assert {"train", "evaluate", "scale", "bench"} <= set(parsers)
    for name, parser in parsers.items():
        text = parser.format_help()
        assert not re.search(r"\bNone\b", text), f"`{name} --help` says None:\n{text}"


def test_examples_keep_their_lines(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # narrower than the examples: they are kept whole anyway
    for name, parser in subcommand_parsers().items():
        text = parser.format_help()
        assert "examples:" in text, name
    train = subcommand_parsers()["train"].format_help()
    assert "  torchrun --standalone --nproc_per_node=4 -m ddp_mnist train --expected-world-size 4\n" in train


# ------------------------------------------------------------------ the renamed flag
def test_compile_is_a_deprecated_name_of_cuda_graph(capsys):
    cfg = parse("--compile", "off")
    assert cfg.cuda_graph == "off"
    err = capsys.readouterr().err
    assert "--compile is deprecated" in err and "use --cuda-graph" in err
    assert parse("--cuda-graph", "on").cuda_graph == "on"
    assert capsys.readouterr().err == ""  # the new name: no warning
    assert not hasattr(TrainConfig(), "compile")


@pytest.mark.process
def test_train_imports_no_other_command():
    """Start-up: `ddp-mnist train`'s parser adds only train's arguments, so the other commands' modules (and
    what they import: scaling, the bench, the trackers' and plots' libraries) are not imported."""
    code = (
        "import sys; from ddp_mnist.commands.cli import build_parser; "
        "build_parser('train').parse_args(['train', '--epochs', '1']); "
        "print(sorted(m for m in sys.modules if m.startswith(('ddp_mnist.commands.', 'ddp_mnist.scaling', "
        "'ddp_mnist.training.bench', 'matplotlib', 'wandb', 'tensorboard', 'torchvision'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=base_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['ddp_mnist.commands.arguments', 'ddp_mnist.commands.cli']", out.stdout
    only_train = dict(subcommands(build_parser("train")))
    assert [a.dest for a in only_train["evaluate"]._actions] == ["help"]  # listed, without its arguments
    assert "--device" in dict(subcommands(build_parser()))["evaluate"].format_help()  # every command's, for help

"""Command-line arguments: `ddp-mnist train`'s flags, made from TrainConfig, and the help layout every
command shares.

Every command that trains (train, and scale for the train flags after `--`) builds its flags here, from
the config alone (one flag per field, in the field's group, with its help, choices and default), so no
command imports another command's module. Where the settings come from (`--config FILE`, `--resume [RUN]`)
is config_sources.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from typing import Any, get_type_hints

from ddp_mnist.artifacts.config_sources import LAUNCH_KEYS, compose_config
from ddp_mnist.config.options import BACKENDS, DATA_DIR_SHOWN, DEVICES, GROUPS, RENAMED_KEYS
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.config.validation import out_of_range


class HelpFormatter(argparse.HelpFormatter):
    """The help of every ddp-mnist command. In descriptions and epilogs, indented lines (the examples) are
    kept as written and the other lines are wrapped as paragraphs. An option's help ends with its default,
    unless the help names it already; a default of None, False or an empty list is not printed: such an
    option's help says in words what happens without it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines: list[str] = []
        paragraph: list[str] = []
        for line in [*text.splitlines(), ""]:
            if line and not line[0].isspace():
                paragraph.append(line.strip())
                continue
            if paragraph:
                lines.append(textwrap.fill(" ".join(paragraph), width, initial_indent=indent, subsequent_indent=indent))
                paragraph.clear()
            lines.append(indent + line if line.strip() else "")
        return "\n".join(lines[:-1])  # without the blank line that ended the last paragraph

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default:" in text
            or "(default" in text
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: {escape(format_default(default))})".strip()


def format_default(value: Any) -> str:
    """A default as a user types it: `1,2` for a list, `on`/`off` for a switch."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def escape(text: str) -> str:
    """Text for an argparse help string, which expands `%(...)s`."""
    return text.replace("%", "%%")


def examples(*lines: str) -> str:
    """An epilog of example commands, one per line, kept as written by HelpFormatter."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown_default(f: dataclasses.Field) -> str:
    """What `--help` names as a field's default: `recipe`, a rule in words, or the value itself."""
    if f.metadata["shown"]:
        return f.metadata["shown"]
    return format_default(f.default)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, named after it, in its group (`ddp-mnist train --help`).

    Every argparse default is None, so `config_from_args` takes only the flags given (the dataclass
    keeps the real defaults); the help names the real default instead.
    """
    hints = get_type_hints(TrainConfig)
    docs = field_docs()  # each field's one help text, in config.py
    old_names = {new: old for old, new in RENAMED_KEYS.items()}
    for title, fields in fields_by_group().items():
        group = parser.add_argument_group(title, GROUPS[title])
        if title == "run folder and checkpoints":
            add_source_arguments(group)  # --config FILE and --resume [RUN] / --no-resume (the `resume` field)
        for f in fields:
            if f.name == "resume":
                continue  # added by add_source_arguments
            value = _value_arguments(f, hints[f.name])
            group.add_argument(
                flag(f.name), default=None, help=f"{docs[f.name]} (default: {escape(shown_default(f))})", **value
            )
            if f.name in old_names:
                group.add_argument(
                    flag(old_names[f.name]),
                    dest=f.name,
                    default=None,
                    action=RenamedFlag,
                    new_flag=flag(f.name),
                    help=f"deprecated name of {flag(f.name)}",
                    **{k: v for k, v in value.items() if k != "action"},
                )


def _value_arguments(f: dataclasses.Field, kind: Any) -> dict[str, Any]:
    """How argparse reads a field's value. Choices are shown (`{mlp,cnn}`) but checked by
    TrainConfig.validate, which says what is wrong the same way for flags and config files."""
    if kind is bool or set(getattr(kind, "__args__", ())) == {bool, type(None)}:  # bool | None: unset = auto
        return {"action": argparse.BooleanOptionalAction}
    if f.name == "wandb_tags":
        return {"type": _comma_list, "metavar": "TAG,..."}
    base = next(t for t in (int, float, str) if t in getattr(kind, "__args__", (kind,)))
    choices = f.metadata["choices"]
    metavar = "{" + ",".join(choices) + "}" if choices else METAVARS.get(base)
    return {"type": base, **({"metavar": metavar} if metavar else {})}


def bounded(kind: type, low: float, high: float) -> Any:
    """An argparse type for the flags of commands that do not train (TrainConfig's ranges are checked with the
    config, validation.RANGES): a finite int or float from `low` to `high` (inclusive), else one line naming the
    flag (argparse adds it), its range and the value. A value that is not a number reads as argparse's
    own "invalid int value: '1e23'"."""

    def parse(text: str) -> int | float:
        value = kind(text)  # ValueError: argparse says "invalid <kind> value"
        problem = out_of_range(value, low, high, integer=kind is int)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


METAVARS = {int: "N", float: "X"}  # strings keep argparse's name (RUN_DIR, WANDB_PROJECT)


def _comma_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


class RenamedFlag(argparse.Action):
    """A flag's old name (config.RENAMED_KEYS): it still works for one release, with a warning."""

    def __init__(self, option_strings: list[str], dest: str, new_flag: str, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag = new_flag

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the next release; "
            f"use {self.new_flag}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The train flags given on the command line, by field name (an absent flag is None in `args`)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """recipe < the resumed run's config.json < --config FILE < the flags given (config_sources.py)."""
    return compose_config(given_values(args), getattr(args, "config", None))


def add_source_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--config FILE`, and `--resume [RUN]` / `--no-resume` (the `resume` field's flags)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="Read settings from a TOML or JSON file holding TrainConfig keys (`lr = 0.01`, as in a "
        "run's config.json, which is itself a valid file); flags given override it. "
        f"{', '.join(LAUNCH_KEYS)} are not read from files. (default: none)",
    )
    parser.add_argument(
        "--resume", nargs="?", const=True, default=None, metavar="RUN", help=field_docs()["resume"] + " (default: off)"
    )
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_const",
        const=False,
        default=None,
        help="Start a new run rather than resume one (default: so, unless --resume is given)",
    )


def add_rank_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a command that runs on every rank like `train` (evaluate, doctor): data, device, backend."""
    p.add_argument(
        "--data-dir", default=None, metavar="DIR", help=f"folder holding MNIST/raw/ (default: {DATA_DIR_SHOWN})"
    )
    p.add_argument("--device", choices=DEVICES, default="auto", help="`auto`: CUDA when available")
    p.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="process-group backend; `auto`: nccl with CUDA, gloo on CPU"
    )


def fields_by_group() -> dict[str, list[dataclasses.Field]]:
    """TrainConfig's fields in their sections (GROUPS order), as `--help` shows them."""
    groups: dict[str, list[dataclasses.Field]] = {name: [] for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        groups[f.metadata["group"]].append(f)
    return groups


def field_docs() -> dict[str, str]:
    """Each TrainConfig field's help text (its metadata), `%` escaped for argparse."""
    return {f.name: f.metadata["help"].replace("%", "%%") for f in dataclasses.fields(TrainConfig)}

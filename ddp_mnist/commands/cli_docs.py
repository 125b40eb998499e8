"""Write docs/cli.md from the argparse parser: `python3 -m ddp_mnist.commands.cli_docs > docs/cli.md`.

The page is each command's `--help`, so it says what the installed parser says; tests/test_docs.py
fails when the two disagree. The width is fixed, so the text does not depend on the terminal.
"""

from __future__ import annotations

import argparse
import os
import sys

from ddp_mnist.commands.cli import build_parser

WIDTH = 100


REGENERATE = "python3 -m ddp_mnist.commands.cli_docs > docs/cli.md"


HEADER = f"""\
# Command-line reference

Generated from the parser by `{REGENERATE}`; do not edit it by hand
(`tests/test_docs.py` fails when this page and the parser disagree). Each section is the command's
`--help`.

In `ddp-mnist train`, hyper-parameters whose help says "default: recipe" take the
recipe's value (`--recipe tutorial` or `fast`); a flag given explicitly always wins, also `0`.
`config.json` in the run folder holds the resolved values. Every launcher (torchrun, accelerate,
SLURM) takes the same `ddp-mnist train` options.
"""


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """Whatever subcommands the parser has, in the order `--help` lists them (aliases once)."""
    found, seen = [], set()
    for action in parser._actions:  # argparse keeps its subparsers here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    found.append((name, sub))
    return found


def help_text(parser: argparse.ArgumentParser) -> str:
    """`--help` at a fixed width: argparse reads the width from $COLUMNS."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        return parser.format_help().rstrip() + "\n"
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def render() -> str:
    parser = build_parser()
    parts = [HEADER, f"## {parser.prog}\n\n```text\n{help_text(parser)}```\n"]
    for _, sub in subcommands(parser):
        parts.append(f"## {sub.prog}\n\n```text\n{help_text(sub)}```\n")
    return "\n".join(parts)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()

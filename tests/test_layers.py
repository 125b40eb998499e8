"""The package's shape, checked over its import graph (module level and inside functions): no cycles, and layers
that import one way only, also under `if TYPE_CHECKING` (docs/layout.md):

    commands -> scaling -> training -> artifacts -> parallel -> the foundation (config, errors, files, data,
    model, optim)
"""

from __future__ import annotations

import ast
import re
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ddp_mnist"

# Lowest first; a module may import its own layer and the layers below it. Modules directly in ddp_mnist/ are
# the foundation.
LAYERS = ("foundation", "parallel", "artifacts", "training", "scaling", "commands")


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(package: Path, type_checking: bool = True) -> dict[str, set[str]]:
    """Each module of `package` (dotted, `pkg.sub.mod`) -> the modules of the package it imports. `from pkg.sub
    import name` counts as importing pkg.sub.name when that is a module, else pkg.sub (its __init__). Imports
    under `if TYPE_CHECKING:` (never run) count only with `type_checking`."""
    paths = sorted(package.rglob("*.py"))
    modules = {module_name(p, package) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        me = module_name(path, package)
        here = me if path.name == "__init__.py" else me.rpartition(".")[0]  # the package a relative import starts in
        found: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        skipped = set()
        if not type_checking:
            for block in ast.walk(tree):
                if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                    skipped |= {id(n) for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[me] = {m for m in found if m in modules and m != me}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list that starts and ends with the same module), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if cycle := visit(imported):
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "foundation"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return package_imports(PACKAGE)


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("VERSION = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub.b import run\nfrom . import VERSION\n")
    (package / "sub" / "b.py").write_text("def run():\n    from pkg import a\n    return a\n")
    (package / "c.py").write_text("import pkg.a\nfrom pkg.sub import b\n")
    (package / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n")
    graph = package_imports(package)
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.sub.b", "pkg"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.a"},
        "pkg.c": {"pkg.a", "pkg.sub.b"},
        "pkg.d": {"pkg.c"},
    }
    assert package_imports(package, type_checking=False)["pkg.d"] == set()
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_the_package(graph):
    assert "ddp_mnist.training.train" in graph["ddp_mnist.commands.cli"]  # a function-level import counts
    cycle = find_cycle(package_imports(PACKAGE, type_checking=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_downwards_only(graph):
    upward = [
        f"{module} ({layer(module)}) imports {imported} ({layer(imported)})"
        for module, imports in graph.items()
        for imported in imports
        if module != "ddp_mnist.__main__" and LAYERS.index(layer(imported)) > LAYERS.index(layer(module))
    ]
    assert not upward, "\n".join(upward)


def test_only_commands_import_commands_and_the_entry_point_is_there(graph):
    outside = [
        m
        for m, imports in graph.items()
        if layer(m) != "commands" and m != "ddp_mnist.__main__" and any(layer(i) == "commands" for i in imports)
    ]
    assert not outside
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ddp-mnist"].startswith("ddp_mnist.commands.")


def test_benchmarks_take_resolved_settings_not_the_training_entry_point(graph):
    for module in ("ddp_mnist.training.bench", "ddp_mnist.commands.bench", "ddp_mnist.scaling.comm_bench"):
        assert "ddp_mnist.training.train" not in graph[module], module
    for module in ("ddp_mnist.training.bench", "ddp_mnist.scaling.comm_bench", "ddp_mnist.training.trainer"):
        assert "ddp_mnist.training.settings" in graph[module], module


def test_parallel_does_not_import_config_for_an_error(graph):
    for module, imports in graph.items():
        if layer(module) == "parallel":
            source = (PACKAGE.parent / (module.replace(".", "/") + ".py")).read_text()
            assert "ConfigError" not in source or "ddp_mnist.errors" in imports, module


def test_error_classes_live_in_errors_py():
    """One place for the errors that end a command with status 2 (errors.CLEAR_ERRORS) and the others."""
    elsewhere = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and path.name != "errors.py":
                elsewhere.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not elsewhere


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_docs_layout_names_every_module():
    """One line per module: `parallel/env.py`, or several of one folder: `commands/evaluate.py`, `export.py`."""
    named = set()
    for cell in re.findall(r"^\| (`[^|]+?) \|", (ROOT / "docs" / "layout.md").read_text(), re.M):
        first, *others = [c.strip("` ").removeprefix("ddp_mnist/") for c in cell.split(",")]
        folder = first.rpartition("/")[0]
        named |= {first, *(f"{folder}/{o}".lstrip("/") for o in others)}
    modules = {
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.parent == PACKAGE or p.stem != "__init__"
    }
    assert not modules - named, f"docs/layout.md has no line for {sorted(modules - named)}"


def test_checkers_are_pinned_alike_in_the_dev_extra_and_pre_commit():
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pins = dict(p.split("==") for p in dev if "==" in p)
    hooks = (ROOT / ".pre-commit-config.yaml").read_text()
    assert {"ruff", "mypy"} <= set(pins)
    assert set(re.findall(r"ruff==([\d.]+)", hooks)) == {pins["ruff"]}
    assert set(re.findall(r"mypy==([\d.]+)", hooks)) == {pins["mypy"]}

"""The docs stay true: docs/faults.md names existing tests, docs/cli.md is the parser's help, and every
link in README.md and docs/*.md to a local file leads to one."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

from conftest import ROOT

from ddp_mnist.commands import cli_docs


def defined_tests() -> dict[str, set[str]]:
    return {
        path.stem: set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
        for path in (ROOT / "tests").glob("test_*.py")
    }


def test_every_row_of_the_faults_table_names_existing_tests():
    tests = defined_tests()
    rows = [
        row
        for row in (ROOT / "docs" / "faults.md").read_text().splitlines()
        if row.startswith("| ") and not row.startswith(("| Fault ", "| Event ", "| Bad input ", "|---"))
    ]
    assert len(rows) >= 30
    for row in rows:
        named, module = [], None
        for token in re.findall(r"`([^`]+)`", row):
            if m := re.fullmatch(r"(test_\w+)\.py(?:::(test_\w+))?(?:\[\.\.\.\])?", token):
                module = m[1]
                named.append((module, m[2]))
            elif (m := re.fullmatch(r"::(test_\w+)(?:\[\.\.\.\])?", token)) and module:
                named.append((module, m[1]))
        assert named, f"no test named in: {row}"
        for module, test in named:
            assert module in tests, f"{module}.py does not exist ({row})"
            assert test is None or test in tests[module], f"{module}.py has no {test} ({row})"


def test_cli_page_is_the_parsers_help():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_docs.render(), f"run {cli_docs.REGENERATE}"


def test_cli_page_has_a_section_per_subcommand():
    names = [name for name, _ in cli_docs.subcommands(cli_docs.build_parser())]
    assert {"train", "evaluate"} <= set(names), names
    page = cli_docs.render()
    for name in names:
        assert f"\n## ddp-mnist {name}\n" in page, name


# [text](target) and ![alt](target); a target may carry a "title" after a space.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def local_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold commands, not links
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, mailto:
    return [unquote(t.split("#", 1)[0]) for t in targets if not t.startswith("#")]


def test_every_local_link_leads_to_a_file():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in pages
        for target in local_links(page)
        if not (page.parent / target).exists()
    ]
    assert not broken, "links to missing files:\n" + "\n".join(broken)
    assert local_links(ROOT / "README.md"), "README.md links to no docs page"


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](page.md) [web](https://example.org/x.md) [gone](docs/nothing.md#part) ![img](a%20b.png)\n"
        "```\n[not a link](in/code.md)\n```\n"
    )
    assert local_links(page) == ["page.md", "docs/nothing.md", "a b.png"]


def test_the_readme_stays_a_front_door():
    """What, install, quick start, links: about 150 lines at most; the long explanations live in docs/."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    quick_start = readme[readme.index("## Quick start") :]
    for command in (
        "pip install . && ddp-mnist train",
        "bash .ci/run",
        "ddp-mnist evaluate runs/latest",
        "ddp-mnist export runs/latest",
        "ddp-mnist predict",
        "ddp-mnist train --resume runs/latest",
    ):
        assert command in quick_start, command


# ------------------------------------------------------------------ the design document
CITATION = re.compile(r"docs/design\.md, ([A-Z0-9][a-z0-9]*(?: [a-z0-9]+)*)")


def design_citations(paths: list[Path], root: Path) -> dict[str, set[str]]:
    """Each section of docs/design.md cited as `docs/design.md, Section` -> the files (relative to `root`) that
    cite it. A bare `design.md` names no section and is reported as `?`."""
    cited: dict[str, set[str]] = {}
    for path in paths:
        text, name = path.read_text(), str(path.relative_to(root))
        for section in CITATION.findall(text):
            cited.setdefault(section, set()).add(name)
        if len(re.findall(r"design\.md", text)) > len(CITATION.findall(text)):
            cited.setdefault("?", set()).add(name)
    return cited


def test_every_design_section_cited_in_the_code_exists():
    sections = set(re.findall(r"^## (.+)$", (ROOT / "docs" / "design.md").read_text(), re.M))
    code = [*(ROOT / "ddp_mnist").rglob("*.py"), *(ROOT / "tests").glob("*.py")]
    cited = design_citations([p for p in code if p.name != "test_docs.py"], ROOT)
    assert len(cited) >= 5  # the code does cite it
    missing = {section: files for section, files in cited.items() if section not in sections}
    assert not missing, f"cited but not a section of docs/design.md (or a bare design.md): {missing}"


def test_the_citation_check_sees_a_missing_section(tmp_path):
    (tmp_path / "a.py").write_text('"""As in docs/design.md, Sampler rule. Also design.md alone."""\n')
    (tmp_path / "b.py").write_text("# docs/design.md, No such section\n")
    cited = design_citations([tmp_path / "a.py", tmp_path / "b.py"], tmp_path)
    assert cited == {"Sampler rule": {"a.py"}, "?": {"a.py"}, "No such section": {"b.py"}}

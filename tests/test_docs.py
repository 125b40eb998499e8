"""docs/faults.md names a test for every fault and bad input: each named test must exist."""

from __future__ import annotations

import re

from conftest import ROOT


def defined_tests() -> dict[str, set[str]]:
    return {path.stem: set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
            for path in (ROOT / "tests").glob("test_*.py")}


def test_every_row_of_the_faults_table_names_existing_tests():
    tests = defined_tests()
    rows = [row for row in (ROOT / "docs" / "faults.md").read_text().splitlines()
            if row.startswith("| ") and not row.startswith(("| Fault ", "| Event ", "| Bad input ", "|---"))]
    assert len(rows) >= 30
    for row in rows:
        named, module = [], None
        for token in re.findall(r"`([^`]+)`", row):
            if (m := re.fullmatch(r"(test_\w+)\.py(?:::(test_\w+))?(?:\[\.\.\.\])?", token)):
                module = m[1]
                named.append((module, m[2]))
            elif (m := re.fullmatch(r"::(test_\w+)(?:\[\.\.\.\])?", token)) and module:
                named.append((module, m[1]))
        assert named, f"no test named in: {row}"
        for module, test in named:
            assert module in tests, f"{module}.py does not exist ({row})"
            assert test is None or test in tests[module], f"{module}.py has no {test} ({row})"

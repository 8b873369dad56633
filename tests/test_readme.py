"""README.rst is the user's manual: it must parse, and its Performance figures must be measured ones.

Every number in a table under "Results per CPU class" has to appear in the ``bench/results/`` file
that the table row names, so the manual cannot drift from the measurements again (the ingest
ratio once read 2.75x "not met" while the file said 5.51x).
"""

from __future__ import annotations

import re

import docutils.core
import docutils.utils
import pytest

from conftest import REPO

README = REPO / "README.rst"
RESULTS = REPO / "bench" / "results"
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
FILE = re.compile(r"``([\w.-]+\.txt)``")
FOLDER = re.compile(r"``bench/results/([\w.-]+)/``")


def performance_results(text: str) -> str:
    """The "Results per CPU class" subsection of Performance, up to the next section."""
    start = text.index("Results per CPU class\n~~~~")
    end = re.compile(r"\n([^\n]+)\n-{3,}\n").search(text, start)
    return text[start:end.start() if end else len(text)]


def numbers(text: str) -> set[str]:
    """Number tokens, thousands separators dropped (``4,391,917`` and ``4391917`` match)."""
    return {n.replace(",", "") for n in NUMBER.findall(text)}


def table_rows(section: str) -> list[tuple[str, str, str]]:
    """(results folder, file, row text) for every row of every simple table in ``section``.

    A row starts with text in the first column; lines whose first column is blank or starts with
    "(" continue it. A row names its file as ``name.txt`` in its first column, or starts with
    "..." and shares the file of the row above. The folder is the one the paragraph above the
    table names as ``bench/results/<folder>/``.
    """
    rows: list[tuple[str, str, str]] = []
    groups: list[list[str]] = []
    folder, borders, width = "", 0, 0
    for line in section.splitlines() + [""]:
        if re.fullmatch(r"=+(\s+=+)+", line):
            borders += 1
            width = line.index(" ")
        elif borders % 3 == 2 and line.strip():  # a table's body: after its 2nd border
            if line[0] not in " (" or not groups:
                groups.append([])
            groups[-1].append(line)
        elif borders % 3 == 0:
            if groups:  # a table just ended
                previous = ""
                for group in groups:
                    first_column = " ".join(text[:width] for text in group)
                    named = FILE.findall(first_column)
                    previous = named[0] if named else previous if group[0].startswith("...") else ""
                    rows.append((folder, previous, FILE.sub("", "\n".join(group))))
                groups = []
            if found := FOLDER.search(line):
                folder = found.group(1)
    return rows


def test_the_readme_parses_without_warnings():
    """A malformed table or a broken reference renders as an error box on PyPI and in docs."""
    doctree = docutils.core.publish_doctree(
        README.read_text(encoding="utf-8"), source_path=str(README),
        settings_overrides={"report_level": 5, "halt_level": 5})
    errors = [m.astext() for m in doctree.findall(docutils.nodes.system_message)
              if m["level"] >= docutils.utils.Reporter.WARNING_LEVEL]
    assert not errors, errors


def test_performance_tables_are_read_in_full():
    """The parser below must see every table and every row, or the next test checks nothing."""
    rows = table_rows(performance_results(README.read_text(encoding="utf-8")))
    folders = {folder for folder, _, _ in rows}
    assert len(folders) >= 2, folders  # one table per CPU class measured
    for folder in folders:
        assert sum(1 for f, _, _ in rows if f == folder) >= 5, folder


@pytest.mark.parametrize("folder, file, row", [
    pytest.param(*row, id=f"{row[0]}/{row[1]}: {row[2].split('  ')[0][:50]}")
    for row in table_rows(performance_results(README.read_text(encoding="utf-8")))])
def test_every_performance_number_is_in_its_results_file(folder, file, row):
    assert file, f"README table row names no bench/results file (``name.txt``, or '...' for the row above's): {row!r}"
    path = RESULTS / folder / file
    assert path.is_file(), f"README names {path.relative_to(REPO)}, which does not exist"
    missing = numbers(row) - numbers(path.read_text(encoding="utf-8"))
    assert not missing, f"README row {row.splitlines()[0]!r}: {sorted(missing)} not in {path.relative_to(REPO)}"

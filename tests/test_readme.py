"""The manual and the benchmark report: they parse, the manual stays short, their links resolve,
and every number in a bench/README.rst table (or a README.rst table with a source column) is in the
results file, and the line or field, that its row names.

The convention (bench/README.rst, "Checked tables", says the same to a writer): a table's last
column is its source; a header ``source in bench/results/DIR/`` makes DIR the folder of its files
(plain ``source``: bench/results/). A row's source cell is ``FILE: KEY``.

- ``.txt``/``.csv``: KEY is the start of exactly one line (runs of spaces count as one);
  ``KEY + KEY`` names several. Every number of the row's other cells must be a number of those
  lines, spelled the same (thousands commas aside).
- ``.json``: KEY selects one object (``results[setup=iid]``). An RST comment ``.. fields: ...``
  right above the table names, per column, the field the column shows: ``name``, ``name[3]``,
  ``a.b``; ``/a.b`` from the file's root; ``-`` for a column without numbers. A number equals its
  field rounded to the decimals shown (before a ``%``: the field times 100); a cell without a
  number stands for null; a text field reads the same, case, ``-`` and ``_`` aside.

A number is digits (optionally signed, with a fraction) not inside a word: ``bf16`` and
``x86_64`` hold none, ``4.66x``, ``-0.11`` and ``1,199,882`` one each.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docutils.core
import docutils.nodes
import docutils.utils
import pytest

from conftest import REPO

README = REPO / "README.rst"
BENCH_README = REPO / "bench" / "README.rst"
CONTRIBUTING = REPO / "CONTRIBUTING.rst"
RESULTS = REPO / "bench" / "results"
MAX_README_BYTES = 20_000

NUMBER = re.compile(r"(?<![^\s(\[:=/,~-])([-+](?=\d))?(\d[\d,]*(?:\.\d+)?)(?!\.?\d)")
SOURCE_HEADER = re.compile(r"source(?: in bench/results/(\S*?)/?)?$")
PART = re.compile(r"[^.\[]+(?:\[[^\]]*\])?")  # "a.b[x=0.3]" -> "a", "b[x=0.3]"
SELECTOR = re.compile(r"(\w+)(?:\[(?:(\w+)=)?([^\]]+)\])?")


@dataclass
class Number:
    text: str  # as written, thousands commas dropped, sign kept
    decimals: int
    percent: bool


def numbers(text: str) -> list[Number]:
    """The numbers of ``text`` (see the module docstring), in order."""
    found = []
    for match in NUMBER.finditer(text):
        digits = match.group(2).rstrip(",").replace(",", "")
        fraction = digits.partition(".")[2]
        percent = text[match.end():].lstrip().startswith("%")
        found.append(Number((match.group(1) or "") + digits, len(fraction), percent))
    return found


def doctree(path: Path) -> docutils.nodes.document:
    return docutils.core.publish_doctree(
        path.read_text(encoding="utf-8"), source_path=str(path),
        settings_overrides={"report_level": 5, "halt_level": 5})


@dataclass
class Row:
    table: int
    folder: Path | None  # None: the table has no source column
    cells: list[str]  # the cells left of the source cell
    source: str
    fields: list[str] | None  # the table's ``.. fields:`` comment, if any

    def __str__(self) -> str:
        return f"table {self.table}: {' | '.join(self.cells)}"


def benchmark_rows(tree: docutils.nodes.document) -> list[Row]:
    """Every body row of every table, with its source cell and its table's folder and fields."""
    rows = []
    for index, table in enumerate(tree.findall(docutils.nodes.table), 1):
        head = next(table.findall(docutils.nodes.thead), None)  # None: a table without a header row
        found = head and SOURCE_HEADER.match([entry.astext() for entry in head.findall(docutils.nodes.entry)][-1])
        folder = RESULTS / found.group(1) if found and found.group(1) else RESULTS if found else None
        previous = table.previous_sibling()
        fields = None
        if isinstance(previous, docutils.nodes.comment) and previous.astext().startswith("fields:"):
            fields = previous.astext().removeprefix("fields:").split()
        for body_row in next(table.findall(docutils.nodes.tbody)).findall(docutils.nodes.row):
            cells = [entry.astext() for entry in body_row.findall(docutils.nodes.entry)]
            rows.append(Row(index, folder, cells[:-1], cells[-1], fields))
    return rows


def text_lines(path: Path, keys: list[str]) -> str:
    """The lines of ``path`` that start with each key (one line per key), joined."""
    lines = [" ".join(line.split()) for line in path.read_text(encoding="utf-8").splitlines()]
    chosen = []
    for key in keys:
        key = " ".join(key.split())
        matching = [line for line in lines if line.startswith(key)]
        assert len(matching) == 1, f"{path.name}: {len(matching)} lines start with {key!r}, expected 1"
        chosen.append(matching[0])
    return "\n".join(chosen)


def walk(value: Any, path: str, file: Path) -> Any:
    """What ``path`` (``name``, ``name[index]``, ``name[field=value]``, joined by ``.``) names."""
    for part in PART.findall(path):
        selector = SELECTOR.fullmatch(part)
        assert selector, f"{file.name}: cannot read {part!r} of {path!r}"
        name, field, wanted = selector.groups()
        assert isinstance(value, dict) and name in value, f"{file.name}: no {name!r} in {path!r}"
        value = value[name]
        if field is None and wanted is not None:
            value = value[int(wanted)]
        elif field is not None:
            try:
                wanted_value = json.loads(wanted)
            except ValueError:
                wanted_value = wanted
            matching = [item for item in value if isinstance(item, dict) and item.get(field) == wanted_value]
            assert len(matching) == 1, f"{file.name}: {len(matching)} items of {name!r} with {field}={wanted}"
            value = matching[0]
    return value


def words(text: str) -> str:
    return " ".join(text.lower().replace("-", " ").replace("_", " ").split())


def equals(number: Number, value: Any) -> bool:
    """``number`` as shown equals ``value`` rounded to its decimals (times 100 before a ``%``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    for scaled in ([value * 100] if number.percent else []) + [value]:
        if number.decimals == 0 and float(scaled).is_integer() and int(scaled) == int(number.text):
            return True
        if number.decimals > 0 and f"{scaled:.{number.decimals}f}" == number.text:
            return True
    return False


def check_row(row: Row) -> None:
    """Raise AssertionError unless every number of ``row`` is in the line or field it names."""
    file_name, colon, keys = row.source.partition(":")
    assert row.folder is not None, f"{row}: the table's last column must be 'source ...'"
    assert colon and keys.strip(), f"{row}: source {row.source!r} must be 'FILE: KEY [+ KEY ...]'"
    path = row.folder / file_name.strip()
    assert path.is_file(), f"{row}: {path.relative_to(REPO)} does not exist"
    if path.suffix == ".json":
        assert row.fields is not None and len(row.fields) == len(row.cells), (
            f"{row}: a JSON row needs a '.. fields:' comment above its table, one field per column")
        root = json.loads(path.read_text(encoding="utf-8"))
        obj = walk(root, keys.strip(), path)
        for cell, field in zip(row.cells, row.fields, strict=True):
            shown = numbers(cell)
            if field == "-":
                assert not shown, f"{row}: column of {cell!r} holds numbers but names no field"
                continue
            value = walk(root, field[1:], path) if field.startswith("/") else walk(obj, field, path)
            claim = f"{row}: {cell!r} is not {field} = {value!r} of {keys.strip()} in {path.name}"
            if isinstance(value, str):
                assert words(cell) == words(value), claim
            elif not shown:
                assert value is None, claim
            else:
                assert all(equals(n, value) for n in shown), claim
        return
    lines = text_lines(path, keys.strip().split(" + "))
    available = {n.text for n in numbers(lines)}
    missing = [n.text for cell in row.cells for n in numbers(cell) if n.text not in available]
    assert not missing, f"{row}: {missing} not in the line(s) it names of {path.name}:\n{lines}"


DOCUMENTS = pytest.mark.parametrize("path", [README, BENCH_README, CONTRIBUTING],
                                    ids=lambda p: p.relative_to(REPO).as_posix())


@DOCUMENTS
def test_the_documents_parse_without_warnings(path):
    """A malformed table or a broken reference renders as an error box on GitHub and PyPI."""
    errors = [m.astext() for m in doctree(path).findall(docutils.nodes.system_message)
              if m["level"] >= docutils.utils.Reporter.WARNING_LEVEL]
    assert not errors, errors


def test_the_manual_stays_a_manual():
    """README.rst is what a newcomer reads first: the numbers and the depth live elsewhere."""
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.rst is {size:,} bytes; the limit is {MAX_README_BYTES:,}"


@DOCUMENTS
def test_links_to_files_of_the_repository_resolve(path):
    """A relative link (``docs/privacy.rst``) must name a file or folder that exists."""
    for reference in doctree(path).findall(docutils.nodes.reference):
        uri = reference.get("refuri", "")
        if uri and "://" not in uri and not uri.startswith(("#", "mailto:")):
            target = (path.parent / uri.split("#")[0]).resolve()
            assert target.exists(), f"{path.name}: link {uri!r} names {target}, which does not exist"


def test_every_benchmark_table_names_its_sources():
    """A table of bench/README.rst without a source column, or a row without a number, checks nothing."""
    rows = benchmark_rows(doctree(BENCH_README))
    unchecked = sorted({row.table for row in rows if row.folder is None})
    assert not unchecked, f"bench/README.rst tables {unchecked}: the last column must be 'source ...'"
    empty = [str(row) for row in rows if not numbers(" ".join(row.cells))]
    assert not empty, f"rows with no number to check: {empty}"


CHECKED_ROWS = benchmark_rows(doctree(BENCH_README)) + [
    row for row in benchmark_rows(doctree(README)) if row.folder is not None]  # the manual's few result tables


@pytest.mark.parametrize("row", CHECKED_ROWS, ids=lambda row: str(row)[:70])
def test_every_benchmark_number_is_in_the_line_its_row_names(row):
    """bench/README.rst's tables, and any table of README.rst with a source column."""
    check_row(row)

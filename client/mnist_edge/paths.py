"""Where a task may read and write: paths a server sends are confined to the node's data directory.

The rule for a path a task gives (an inference task's ``data`` and ``output``, the model id that
names the default output): it is taken relative to the node's data directory, resolved after
following symbolic links, and must stay inside that directory, else the task fails naming the
parameter; an output that would replace one of the task's input shards is refused. How outputs
are written is :mod:`mnist_edge.files`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError
from .shards import describe

_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class PathError(UserError, ValueError):
    """A task's path parameter points outside the data directory or at something not writable."""


def inside_data_dir(data_dir: Path, value: object, parameter: str) -> Path:
    """``value`` (relative to ``data_dir``) resolved, if it stays inside ``data_dir``; else PathError."""
    if not isinstance(value, str) or not value:
        raise PathError(f"parameter {parameter!r} must be a non-empty path string, got {type(value).__name__}")
    if "\x00" in value:
        raise PathError(f"parameter {parameter!r} contains a NUL character, expected a path")
    root = Path(data_dir).resolve()
    resolved = (root / value).resolve()
    if resolved != root and root not in resolved.parents:
        raise PathError(f"parameter {parameter!r} ({describe(value)}) is outside the node's data directory "
                        f"{root}: task paths are resolved, symbolic links followed, and must stay inside it")
    return resolved


def file_name(value: object, parameter: str) -> str:
    """``value`` as one file name (letters, digits, ``.``, ``_``, ``-``; no separators, no leading dot)."""
    if not isinstance(value, str) or not _FILE_NAME.fullmatch(value):
        raise PathError(f"{parameter} {describe(str(value))} cannot name a file: expected 1-200 letters, digits, "
                        "'.', '_' or '-', not starting with '.'")
    return value


def refuse_inputs(path: Path, inputs: Iterable[Path], what: str) -> None:
    """PathError if ``path`` is one of ``inputs`` or inside one of them (a split directory)."""
    target = path.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or source in target.parents:
            raise PathError(f"{what} {path} would replace input data ({source}); "
                            "write outputs outside the train/test/predict shards")


def refuse_node_files(path: Path, owned: Iterable[Path], what: str) -> None:
    """PathError if ``path`` is, or is inside, one of the node's own files (its privacy ledger)."""
    target = path.resolve()
    for own in owned:
        own = Path(own).resolve()
        if target == own or own in target.parents:
            raise PathError(f"{what} {path} would write into the node's own state ({own}: its privacy ledger), "
                            "which no task may touch; write outputs elsewhere in the data directory")

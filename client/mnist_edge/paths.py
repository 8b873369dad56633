"""Where a task may read and write: paths a server sends are confined to the node's data directory.

The rules for a path a task gives (an inference task's ``data`` and ``output``, the model id that
names the default output): a string of at most :data:`MAX_PATH_CHARS` characters, taken relative
to the node's data directory, resolved after following symbolic links, that must stay inside that
directory and may not pass through a hidden name (the node's own state, ``.mnist-edge/``, holds the
privacy ledger), else the task fails naming the parameter and quoting at most a short excerpt of
it. What predictions may be written where is :mod:`mnist_edge.outputs`; how outputs are written is
:mod:`mnist_edge.files`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError
from .shards import describe

MAX_PATH_CHARS = 256
"""Longest path a task may give (``data``, ``output``): longer ones are refused, never echoed."""
MAX_NAME_CHARS = 128
_FILE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}")
FILE_NAME_RULE = f"1-{MAX_NAME_CHARS} letters, digits, '.', '_' or '-', not starting with '.'"


class PathError(UserError, ValueError):
    """A task's path parameter points outside the data directory or at something not writable."""


def task_string(value: object, parameter: str, limit: int = MAX_PATH_CHARS) -> str:
    """``value`` if it is a non-empty string of at most ``limit`` characters without NUL; else PathError."""
    if not isinstance(value, str) or not value:
        raise PathError(f"parameter {parameter!r} must be a non-empty path string, got {type(value).__name__}")
    if len(value) > limit:
        raise PathError(f"parameter {parameter!r} is {len(value):,} characters long, at most {limit} allowed")
    if "\x00" in value:
        raise PathError(f"parameter {parameter!r} contains a NUL character, expected a path")
    return value


def inside_data_dir(data_dir: Path, value: object, parameter: str) -> Path:
    """``value`` (relative to ``data_dir``) resolved, if it stays inside ``data_dir``; else PathError."""
    value = task_string(value, parameter)
    root = Path(data_dir).resolve()
    resolved = (root / value).resolve()
    if resolved != root and root not in resolved.parents:
        raise PathError(f"parameter {parameter!r} ({describe(value)}) is outside the node's data directory "
                        f"{root}: task paths are resolved, symbolic links followed, and must stay inside it")
    hidden = [part for part in resolved.relative_to(root).parts if part.startswith(".")]
    if hidden:
        raise PathError(f"parameter {parameter!r} ({describe(value)}) leads into a hidden name "
                        f"({describe(hidden[0])}) of the data directory; the node's own files are not a task's")
    return resolved


def file_name(value: object, parameter: str) -> str:
    """``value`` as one file name (:data:`FILE_NAME_RULE`): no separators, no leading dot."""
    if not isinstance(value, str) or not _FILE_NAME.fullmatch(value):
        shown = describe(value) if isinstance(value, str) else type(value).__name__
        raise PathError(f"{parameter} {shown} cannot name a file: expected {FILE_NAME_RULE}")
    return value


def relative_parts(value: object, parameter: str, max_depth: int = 8) -> tuple[str, ...]:
    """``value`` as a relative path of at most ``max_depth`` plain names (:func:`file_name` each).

    What an output may be: no absolute path, no ``..``, no hidden name, no link to resolve, so the
    path is inside the data directory by its spelling alone and can be walked without following links.
    """
    value = task_string(value, parameter)
    parts = tuple(value.split("/"))
    if value.startswith("/") or len(parts) > max_depth:
        raise PathError(f"parameter {parameter!r} ({describe(value)}) must be a relative path of at most "
                        f"{max_depth} names inside the node's data directory")
    for part in parts:
        if part not in ("", ".") and not _FILE_NAME.fullmatch(part):
            raise PathError(f"parameter {parameter!r} ({describe(value)}): the name {describe(part)} is not "
                            f"allowed; each name in it must be {FILE_NAME_RULE}")
    parts = tuple(part for part in parts if part not in ("", "."))
    if not parts:
        raise PathError(f"parameter {parameter!r} ({describe(value)}) names no file")
    return parts


def _within(path: Path, places: Iterable[Path]) -> Path | None:
    """The first of ``places`` that ``path`` is, or is inside (both resolved); None if none.

    A path that cannot be resolved (a symbolic link loop, or a link swapped for a directory while
    it is read) is refused rather than passed on as a bare OSError."""
    target = _resolved(path)
    for place in places:
        place = _resolved(Path(place))
        if target == place or place in target.parents:
            return place
    return None


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a link loop before Python 3.13
        raise PathError(f"{path} cannot be resolved ({type(error).__name__}): a symbolic link in it loops "
                        "or changed while it was checked") from None


def refuse_inputs(path: Path, inputs: Iterable[Path], what: str) -> None:
    """PathError if ``path`` is one of ``inputs`` or inside one of them (a split directory)."""
    source = _within(path, inputs)
    if source is not None:
        raise PathError(f"{what} {path} would replace input data ({source}); "
                        "write outputs outside the train/test/predict shards")


def refuse_node_files(path: Path, owned: Iterable[Path], what: str) -> None:
    """PathError if ``path`` is, or is inside, one of the node's own files (its privacy ledger)."""
    own = _within(path, owned)
    if own is not None:
        raise PathError(f"{what} {path} would write into the node's own state ({own}: its privacy ledger), "
                        "which no task may touch; write outputs elsewhere in the data directory")

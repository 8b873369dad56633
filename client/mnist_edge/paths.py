"""Where a task may read and write, and how files are written so no half of one is ever seen.

The rule for a path a task gives (an inference task's ``data`` and ``output``, the model id that
names the default output): it is taken relative to the node's data directory, resolved after
following symbolic links, and must stay inside that directory, else the task fails naming the
parameter. Outputs are written to a temporary file in the target's directory, flushed to disk
and renamed over the target, so a reader (or a crash) sees the old file or the new one, never a
part; an output that would replace one of the task's input shards is refused.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterable

from .shards import describe

PARTIAL_SUFFIX = ".partial"
"""Suffix of the temporary file an output is written to before the rename."""
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class PathError(ValueError):
    """A task's path parameter points outside the data directory or at something not writable."""


class OutputError(OSError):
    """An output could not be written (full disk, read-only, ...); nothing was left at the path."""

    @classmethod
    def of(cls, path: Path, error: OSError, outcome: str = "") -> OutputError:
        made = cls(f"{path}: cannot write ({error.strerror or error}){outcome}")
        made.path, made.cause_errno = path, error.errno  # not OSError's own fields: they would reformat str()
        return made


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


def atomic_write(path: Path, write: Callable[[IO], None], mode: str = "w") -> Path:
    """Write ``path`` via a temporary file in its directory, fsync, then rename over it.

    ``write`` gets the open file (text with ``mode="w"``, binary with ``"wb"``). On any error the
    temporary file is removed and the target is left as it was; disk errors become
    :class:`OutputError` naming the path. Stale temporary files of an earlier crash are removed.
    """
    path = Path(path)
    check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    except OSError as error:
        raise OutputError.of(path, error) from error
    try:
        text = {"encoding": "utf-8", "newline": ""} if "b" not in mode else {}
        with os.fdopen(fd, mode, **text) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise OutputError.of(path, error, "; nothing was written") from error
        raise
    _sync_directory(path.parent)
    return path


def check_target(path: Path) -> None:
    """Refuse a path that cannot be a file's target (a directory, a device): before any work is done."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise OutputError.of(path, error) from error
    if stat.S_ISDIR(mode):
        raise PathError(f"{path}: is a directory, expected a file path to write")
    if not stat.S_ISREG(mode):
        raise PathError(f"{path}: exists and is not a regular file (a device, FIFO or socket); refusing to write")


def _remove_stale(path: Path) -> None:
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def remove_partial_files(directory: Path) -> int:
    """Remove temporary output files a crash left in ``directory``; returns how many."""
    removed = 0
    for stale in Path(directory).glob(f".*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed += 1
    return removed


def _sync_directory(directory: Path) -> None:
    """Make the rename durable (best effort: not every filesystem lets a directory be fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Where an inference task may write: only files it creates, or files an earlier prediction wrote.

The server chooses ``output`` (or the model id names ``predictions/<model id>.csv``), but the data
directory also holds the node's shards, the operator's own files and the node's state. So a
prediction is written only

- at a relative path of plain names (:func:`paths.relative_parts`): nothing to resolve, no hidden
  name (the node's state directory, ``.mnist-edge/``, holds the privacy ledger), no ``..``;
- whose first name is none a split could take in either layout (``train``, ``train.csv``,
  ``test``, ``test.csv``, ``predict``, ``predict.csv``, in any case): a new ``train/`` would shadow
  ``train.csv`` and fail every later train task;
- where nothing is yet, or where an earlier prediction of this node wrote a file that nobody has
  changed since. How the node knows: every prediction it writes is recorded with its sha256 in
  ``.mnist-edge/predictions.json`` (:data:`RECORD_NAME`); a file that is not recorded, or whose
  content changed, is the operator's and is never replaced.

Directories are walked from the data directory one name at a time with ``O_NOFOLLOW`` and the file
is linked into place only if its name is still free (renamed over the recorded file otherwise), so
a symbolic link swapped in anywhere on the way between the check and the write fails the task; it
is never followed. A refused output writes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import files, paths
from .data import SPLITS
from .node import STATE_DIR
from .paths import PathError

log = logging.getLogger("mnist_edge")
RECORD_NAME = "predictions.json"
LOCK_NAME = "predictions.lock"
MAX_RECORDED = 10_000
"""Predictions remembered; past that the oldest are forgotten (and so never replaced again)."""
MAX_RECORD_BYTES = 4 << 20
RESERVED = frozenset(name for split in SPLITS for name in (split, f"{split}.csv"))
"""First names an output may not have (compared case-insensitively): a split's, in either layout."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Output:
    """A prediction file: ``parts`` below the (resolved) data directory ``root``."""

    root: Path
    parts: tuple[str, ...]

    @property
    def path(self) -> Path:
        return self.root.joinpath(*self.parts)

    @property
    def key(self) -> str:
        return "/".join(self.parts)


def choose(data_dir: Path, value: object | None, model_id: str, reads: Path) -> Output:
    """Where this task's predictions go (``value``: the ``output`` parameter, None for the default).

    Checked before any work: PathError or :class:`files.TargetError` if the file may not be written.
    ``model_id`` must already be a plain name; ``reads`` is the location the task reads.
    """
    root = Path(data_dir).resolve()
    if value is None:
        parts = ("predictions", paths.file_name(model_id, "model id") + ".csv")
    else:
        paths.inside_data_dir(root, value, "output")  # resolved: says "outside" for what leads out
        parts = paths.relative_parts(value, "output")
    if parts[0].lower() in RESERVED:
        raise PathError(f"parameter 'output' starts with {parts[0]!r}, a name the node's train/test/predict "
                        "splits use (as a directory or a .csv file): outputs may not take it")
    output = Output(root, parts)
    paths.refuse_inputs(output.path, [reads], "parameter 'output'")
    _replaceable(output, _read_record(root))
    return output


def write(output: Output, rows: Callable[[IO], None]) -> str:
    """Write ``rows`` (given a text file) to ``output``, record it; returns its sha256."""
    with _locked(output.root) as state:
        record = _read_record(output.root)
        replace = _replaceable(output, record)  # again, now no other prediction can write
        try:
            directory = files.open_directory(output.path.parent, inside=output.root)
        except OSError as error:
            raise _walk_error(output, error) from None
        digest = hashlib.sha256()
        try:
            files.write_in(directory, output.path, lambda handle: rows(_HashingText(handle, digest)), "wb", replace)
        finally:
            os.close(directory)
        record.pop(output.key, None)
        record[output.key] = digest.hexdigest()
        _write_record(state, output.root, record)
    return digest.hexdigest()


def _replaceable(output: Output, record: dict[str, str]) -> bool:
    """False when nothing is at ``output`` yet, True when this node's unchanged prediction is; else refused."""
    try:
        directory = files.open_directory(output.path.parent, inside=output.root, create=False)
    except FileNotFoundError:
        return False  # a directory on the way is missing, so is the file
    except OSError as error:
        raise _walk_error(output, error) from None
    try:
        try:
            mode = os.stat(output.parts[-1], dir_fd=directory, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return False
        files.check_kind(output.path, mode)
        recorded = record.get(output.key)
        if recorded is None:
            raise files.TargetError(f"{output.path}: exists and no prediction of this node wrote it; a prediction "
                                    "never replaces another file (choose another output, or remove that file)")
        if _sha256_at(directory, output) != recorded:
            raise files.TargetError(f"{output.path}: changed since this node's prediction wrote it, so it is "
                                    "someone's file now and is not replaced (choose another output, or remove it)")
        return True
    finally:
        os.close(directory)


def _walk_error(output: Output, error: OSError) -> Exception:
    if error.errno in (errno.ELOOP, errno.ENOTDIR):
        return files.TargetError(f"{output.path}: a name on the way is a symbolic link or not a directory; "
                                 "outputs are written through real directories of the data directory only")
    return files.OutputError.of(output.path, error)


def _sha256_at(directory: int, output: Output) -> str:
    try:
        fd = os.open(output.parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    except OSError as error:
        raise _walk_error(output, error) from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise files.TargetError(f"{output.path}: is not a regular file; refusing to write")
        return hashlib.file_digest(handle, "sha256").hexdigest()


class _HashingText:
    """A text file for ``csv.writer`` that writes UTF-8 to a binary file and hashes what it writes."""

    def __init__(self, handle: IO[bytes], digest: Any) -> None:
        self.handle, self.digest = handle, digest

    def write(self, text: str) -> int:
        raw = text.encode("utf-8")
        self.digest.update(raw)
        self.handle.write(raw)
        return len(text)


# -- the record of written predictions, in the node's state directory ----------------------------


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[int]:
    """The state directory's descriptor, with the predictions lock held (one writer of the record)."""
    state_path = root / STATE_DIR
    try:
        state = files.open_directory(state_path, inside=root)
        lock = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=state)
    except OSError as error:
        raise files.OutputError(f"{state_path}: cannot open the node's state directory "
                                f"({error.strerror or error})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield state
    finally:
        os.close(lock)
        os.close(state)


def _read_record(root: Path) -> dict[str, str]:
    """The recorded predictions (path -> sha256); a missing or unreadable record is empty (fail closed:
    then nothing existing is replaced)."""
    path = root / STATE_DIR / RECORD_NAME
    try:
        state = files.open_directory(path.parent, inside=root, create=False)
    except OSError:
        return {}
    try:
        fd = os.open(RECORD_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=state)
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read(MAX_RECORD_BYTES + 1)
        document = json.loads(raw) if len(raw) <= MAX_RECORD_BYTES else None
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError):
        document = None
    finally:
        os.close(state)
    outputs = document.get("outputs") if isinstance(document, dict) and document.get("format") == 1 else None
    if not isinstance(outputs, dict) or not all(isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v)
                                                for k, v in outputs.items()):
        log.warning("%s is unreadable: no earlier prediction will be replaced", path)
        return {}
    return outputs


def _write_record(state: int, root: Path, record: dict[str, str]) -> None:
    kept = {key: sha for key, sha in record.items() if os.path.lexists(root / key)}
    kept = dict(list(kept.items())[-MAX_RECORDED:])
    text = json.dumps({"format": 1, "outputs": kept}, indent=1) + "\n"
    files.write_in(state, root / STATE_DIR / RECORD_NAME, lambda handle: handle.write(text))

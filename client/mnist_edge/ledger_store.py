"""How the privacy ledger's bytes reach the disk and come back, whatever the disk does.

- **Only a regular file is a ledger.** It is opened with ``O_NONBLOCK`` and checked with ``fstat``
  before anything is read, so a FIFO, a device or a directory at its path is refused at once,
  never waited on.
- **A charge is written in full or not at all.** ``os.write`` may write less than asked (a nearly
  full filesystem, ``RLIMIT_FSIZE``): the rest is written in a loop, and any error cuts the file
  back to where the record began and raises :class:`ChargeFailed` naming the ledger. A written
  record is fsync'd and read back before the round may train.
- **The head** (``<ledger>.head``, beside it) is what the ledger held after its last charge: the
  number of records, the last record's hash and the ε spent (an *anchor*: a ledger with fewer
  records, or another record at that place, was rolled back), plus a *checkpoint*: the sha256 of
  the bytes those records take and their composed RDP curve, so a charge only recomputes the
  records after it. It is replaced atomically, under the ledger's lock, after the record is durable.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import UserError
from .files import TargetError, atomic_write, fsync_directory

HEAD_SUFFIX = ".head"
HEAD_FORMAT = 1
MAX_HEAD_BYTES = 64 * 1024  # a head is ~4 KB: a larger file is not one
_SHA256_HEX = 64


class PrivacyError(UserError, ValueError):
    """A DP round cannot run as asked; the message says why."""


class LedgerError(PrivacyError):
    """The ledger is unreadable, corrupt, edited or rolled back: train tasks fail until a person looks at it."""


class ChargeFailed(PrivacyError):
    """The round's charge could not be made durable (full disk, file size limit, I/O error): nothing trained."""


def head_path(path: Path) -> Path:
    return path.with_name(path.name + HEAD_SUFFIX)


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _open_regular(path: Path, flags: int, what: str) -> int | None:
    """``path`` opened with ``flags`` if it is a regular file (None when missing and not created).

    ``O_NONBLOCK``: opening a FIFO returns at once instead of waiting for a writer; ``fstat`` then
    refuses it. A regular file ignores the flag.
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        if flags & os.O_CREAT:
            raise
        return None
    except IsADirectoryError:
        raise LedgerError(f"{what} {path} cannot be read: it is a directory, not a regular file") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise LedgerError(f"{what} {path} cannot be read: it is {_kind(mode)}, not a regular file; "
                          "refused without reading it")
    return fd


def _open_to_read(path: Path, what: str) -> int | None:
    """``path`` opened read-only if it is a regular file, None if absent; LedgerError naming ``what`` else."""
    try:
        return _open_regular(path, os.O_RDONLY, what)
    except OSError as error:
        raise LedgerError(f"{what} {path} cannot be read: {error.strerror or error}") from None


@contextlib.contextmanager
def locked(path: Path, *, charge: bool) -> Iterator[int | None]:
    """The ledger's file descriptor under its ``flock``: exclusive (and created) to charge, shared to read.

    A reader gets None when there is no ledger. A charge reads the ledger and its head and writes
    both under the exclusive lock, so a reader holding the shared one sees them agree.
    """
    if charge:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = _open_regular(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, "privacy ledger")
        except OSError as error:
            raise ChargeFailed(f"privacy ledger {path}: cannot be opened to charge this round "
                               f"({error.strerror or error}); refused before training, no update leaves "
                               "this node") from None
    else:
        fd = _open_to_read(path, "privacy ledger")
    if fd is None:
        yield None
        return
    try:
        if charge and os.fstat(fd).st_size == 0:  # perhaps new: its directory entry must survive a power cut
            fsync_directory(path.parent)
        fcntl.flock(fd, fcntl.LOCK_EX if charge else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)


def read_all(fd: int) -> bytes:
    """Every byte of the open file, from its start."""
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def append(fd: int, path: Path, keep: int, data: bytes) -> None:
    """Cut the ledger to ``keep`` bytes and append ``data`` durably, or leave it at ``keep`` and raise.

    Every byte is written (a short write continues where it stopped), fsync'd, then read back and
    compared. On any error the file is cut back to ``keep`` so the fragment is not left behind,
    and :class:`ChargeFailed` names the ledger, the system's reason and how far the write got.
    """
    written = 0
    try:
        if os.fstat(fd).st_size != keep:
            os.ftruncate(fd, keep)  # a torn tail, or a record's damaged newline
        while written < len(data):
            count = os.write(fd, data[written:])
            if count <= 0:
                raise OSError(0, "the system wrote no byte")
            written += count
        os.fsync(fd)
        if os.pread(fd, len(data) + 1, keep) != data:
            raise OSError(0, "the record read back is not the one written")
    except OSError as error:
        with contextlib.suppress(OSError):  # cutting a file back needs no space
            os.ftruncate(fd, keep)
            os.fsync(fd)
        raise ChargeFailed(
            f"privacy ledger {path}: this round's charge could not be written ({error.strerror or error}; "
            f"{written} of {len(data)} bytes written, then cut back): the round is not charged, no training "
            "ran and no update leaves this node. Free space on the ledger's filesystem (or raise the file "
            "size limit) and retry") from None


@dataclass(frozen=True)
class Head:
    """The ledger after its last charge: the anchor against rollback and the verified checkpoint."""

    records: int  # how many records the ledger held
    size: int  # the bytes they take: up to the end of the last record's JSON (its newline excluded)
    prefix_sha256: str  # sha256 of those bytes
    last_hash: str  # sha256 of the last record's line: the "prev" of the next
    epsilon_spent: float  # the last record's epsilon_total
    delta: float
    orders: list[float]  # the RDP orders of ``rdp`` (Opacus's; a checkpoint at other orders is not used)
    rdp: list[float]  # the composed RDP curve of those records


def corrupt_head(path: Path, what: str) -> LedgerError:
    return LedgerError(
        f"privacy ledger head {path}: {what}. It anchors the ledger against a rollback, so it is never "
        "ignored: restore it from a backup, or (the node's operator only, after checking the ledger with "
        "`python -m mnist_edge privacy --full`) remove it")


def _check_head(path: Path, raw: object) -> Head:
    names = ["format", *(f.name for f in fields(Head))]
    if not isinstance(raw, dict) or sorted(raw) != sorted(names):
        raise corrupt_head(path, f"expected a JSON object with the keys {', '.join(names)}")
    if raw.pop("format") != HEAD_FORMAT:
        raise corrupt_head(path, f"format is not {HEAD_FORMAT}")
    def count(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0

    curves = [raw["orders"], raw["rdp"]]
    if not (count(raw["records"]) and count(raw["size"])
            and all(isinstance(raw[k], str) and len(raw[k]) == _SHA256_HEX for k in ("prefix_sha256", "last_hash"))
            and number(raw["epsilon_spent"]) and number(raw["delta"])
            and all(isinstance(c, list) and len(c) == len(raw["orders"]) > 0 and all(map(number, c)) for c in curves)):
        raise corrupt_head(path, "records and size must be integers >= 1, the hashes sha256 hex digests, "
                                 "and epsilon_spent, delta, orders and rdp finite numbers >= 0")
    return Head(**raw)


def read_head(path: Path) -> Head | None:
    """The head beside the ledger at ``path``; None when there is none (a ledger from before heads)."""
    where = head_path(path)
    fd = _open_to_read(where, "privacy ledger head")
    if fd is None:
        return None
    try:
        content = os.pread(fd, MAX_HEAD_BYTES + 1, 0)
    finally:
        os.close(fd)
    if len(content) > MAX_HEAD_BYTES:
        raise corrupt_head(where, f"larger than {MAX_HEAD_BYTES} bytes")
    try:
        raw = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt_head(where, "not JSON") from None
    return _check_head(where, raw)


def write_head(path: Path, head: Head) -> None:
    """Replace the head atomically; a failure fails the round (charged, but nothing trained)."""
    text = json.dumps({"format": HEAD_FORMAT, **vars(head)}, sort_keys=True) + "\n"
    try:
        atomic_write(head_path(path), lambda handle: handle.write(text))
    except (OSError, TargetError) as error:
        raise ChargeFailed(f"privacy ledger {path}: this round is charged, but the ledger's head could not be "
                           f"written ({error}): refused before training, no update leaves this node. Free "
                           "space on the ledger's filesystem and retry") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remove(path: Path) -> None:
    """Remove a ledger and its head: a new budget (what ``simulate`` does for a new federation)."""
    for file in (path, head_path(path)):
        with contextlib.suppress(FileNotFoundError):
            file.unlink()

"""Writing files so that no half of one is ever seen, and no writer breaks another's.

Every output (models, metas, predictions, shards, histories) is written to a temporary file in the
target's directory, flushed to disk and renamed over the target: a reader, or a crash, sees the old
file or the new one. A temporary file is ``.<name>.<pid>.<random>.partial`` and its writer holds an
``flock`` on it while writing, so a crash leaves a file whose lock is free: only such a file, older
than :data:`STALE_SECONDS`, is ever removed by someone else. Directories are opened one component at
a time without following symbolic links when the write must stay inside a directory (``inside``),
so a link swapped in between a check and the write cannot carry it elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import UserError

PARTIAL_SUFFIX = ".partial"
STALE_SECONDS = 10.0
"""A temporary file whose lock is free and that is older than this was left by a writer that died."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TargetError(UserError, ValueError):
    """An output path cannot be written as asked (a directory, a link, a device); nothing was done."""


class OutputError(UserError, OSError):
    """An output could not be written (full disk, read-only, ...); nothing was left at the path."""

    @classmethod
    def of(cls, path: Path, error: OSError, outcome: str = "") -> OutputError:
        return cls(f"{path}: cannot write ({error.strerror or error}){outcome}")


def check_target(path: Path) -> None:
    """Refuse a target that is not a regular file or absent (a directory, a link, a FIFO): before any work."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise OutputError.of(path, error) from error
    check_kind(path, mode)


def check_kind(path: Path, mode: int) -> None:
    """:func:`check_target` for an ``lstat`` mode already taken (of an existing ``path``)."""
    if stat.S_ISDIR(mode):
        raise TargetError(f"{path}: is a directory, expected a file path to write")
    if stat.S_ISLNK(mode):
        raise TargetError(f"{path}: is a symbolic link; refusing to write through or over it")
    if not stat.S_ISREG(mode):
        raise TargetError(f"{path}: exists and is not a regular file (a device, FIFO or socket); refusing to write")


def open_directory(directory: Path, inside: Path | None = None, create: bool = True) -> int:
    """A file descriptor of ``directory``, made if missing; with ``inside``, walked from there.

    Every component below ``inside`` is opened with ``O_NOFOLLOW``: a symbolic link anywhere on the
    way fails with ``ELOOP``/``ENOTDIR`` instead of being followed.
    """
    if inside is None:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        return os.open(directory, _DIR_FLAGS & ~os.O_NOFOLLOW)
    parts = directory.relative_to(inside).parts
    fd = os.open(inside, _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def atomic_write(path: Path, write: Callable[[IO], None], mode: str = "w", inside: Path | None = None) -> Path:
    """Write ``path`` through a locked temporary file in its directory, fsync, rename over it.

    ``write`` gets the open file (text with ``mode="w"``, binary with ``"wb"``). On any error the
    temporary file is removed and the target is left as it was; disk errors become
    :class:`OutputError` naming the path. ``inside``: the write must stay in that directory.
    """
    path = Path(path)
    check_target(path)
    try:
        directory = open_directory(path.parent, inside)
    except OSError as error:
        raise OutputError.of(path, error) from error
    try:
        write_in(directory, path, write, mode)
    finally:
        os.close(directory)
    return path


def write_in(directory: int, path: Path, write: Callable[[IO], None], mode: str = "w", replace: bool = True) -> None:
    """:func:`atomic_write` of ``path.name`` in an open ``directory`` (a descriptor the caller walked to).

    With ``replace=False`` the file is linked into place, which fails if the name exists by then
    (:class:`TargetError`): a file that appeared while this one was written is never replaced. The
    final name is never followed either way: a rename or link replaces a symbolic link, not its target.
    """
    remove_stale_partials(directory, path.name)
    _write_and_rename(directory, path, write, mode, replace)


def _put_in_place(directory: int, temporary: str, path: Path, replace: bool) -> None:
    if replace:
        os.replace(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        return
    try:
        os.link(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=False)
    except FileExistsError:
        raise TargetError(f"{path}: appeared while it was being written; refusing to replace it") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        try:  # a filesystem without hard links: the name is checked, then renamed over (a short race)
            os.stat(path.name, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            os.replace(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory)
            return
        raise TargetError(f"{path}: appeared while it was being written; refusing to replace it") from None
    os.unlink(temporary, dir_fd=directory)


def _write_and_rename(directory: int, path: Path, write: Callable[[IO], None], mode: str, replace: bool) -> None:
    temporary = f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=directory)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until closed: the file is in use, not left by a crash
    except OSError as error:
        raise OutputError.of(path, error) from error
    try:
        text = {"encoding": "utf-8", "newline": ""} if "b" not in mode else {}
        with os.fdopen(fd, mode, **text) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            _put_in_place(directory, temporary, path, replace)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=directory)
        if isinstance(error, OSError) and not isinstance(error, UserError):
            raise OutputError.of(path, error, "; nothing was written") from error
        raise
    fsync_directory(directory)


def remove_stale_partials(directory: int | Path, name: str | None = None) -> int:
    """Remove the temporary files writers that died left (of ``name``, or all); returns how many.

    A file is stale only when its lock can be taken (no process holds it) and it is older than
    :data:`STALE_SECONDS` (its writer would have locked it at once): live writers are never touched.
    """
    owned = isinstance(directory, int)
    fd = directory if owned else os.open(directory, _DIR_FLAGS & ~os.O_NOFOLLOW)
    pattern = f".{glob.escape(name)}.*{PARTIAL_SUFFIX}" if name else f".*{PARTIAL_SUFFIX}"
    removed = 0
    try:
        for entry in os.listdir(fd):
            if fnmatch.fnmatchcase(entry, pattern) and _stale(fd, entry):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=fd)
                    removed += 1
    finally:
        if not owned:
            os.close(fd)
    return removed


def _stale(directory: int, entry: str) -> bool:
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    except OSError:
        return False
    try:
        if time.time() - os.fstat(fd).st_mtime < STALE_SECONDS:
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True  # the lock is released when fd closes, just before the unlink
    except OSError:
        return False
    finally:
        os.close(fd)


def fsync_directory(directory: int | Path) -> None:
    """Make a rename or a new entry durable (best effort: not every filesystem syncs a directory)."""
    try:
        fd = directory if isinstance(directory, int) else os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        if not isinstance(directory, int):
            os.close(fd)


def sha256_file(path: Path) -> str:
    """sha256 of a whole file, read in 1 MiB blocks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@contextlib.contextmanager
def exclusive(path: Path, holder_pids: Callable[[Path], set[int]] | None = None) -> Iterator[None]:
    """Hold ``path``'s ``flock`` while the block runs: N processes sharing it compute one at a time.

    The same lock scaleout 1.1's ``FileLock`` takes (an ``flock`` on the file), so clients of either
    line exclude each other. A lock this process's parent (or its parent, ...) holds already covers
    this process too (``holder_pids``: who holds it now; a child waiting for it would never get it).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if holder_pids is None or not holder_pids(path) & ancestors():
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def ancestors() -> set[int]:
    """This process's parent, its parent, and so on (Linux: from /proc)."""
    found, pid = set(), os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
                pid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


def flock_holders(path: Path) -> set[int]:
    """The processes holding an ``flock`` on ``path`` (Linux: /proc/locks), by the file's inode."""
    try:
        status = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return set()
    inode = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    return {int(fields[4]) for fields in (line.split() for line in lines)
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode and fields[4].isdigit()}

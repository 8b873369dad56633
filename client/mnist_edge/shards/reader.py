"""The general reader: a shard read once, block by block, one line per row, every row judged once.

A row is one line (LF or CRLF). Quoted fields may hold commas and doubled quotes but not line
breaks, so a quote left open is a bad row at its own line instead of swallowing the rows after
it. A line longer than :data:`MAX_LINE_BYTES` is a bad row, found while reading (it is dropped
as it streams past, never held whole). Each block is hashed as it is read, so the fingerprint
is of exactly the bytes the rows came from. With ``fast=True`` (the default) blocks go through
:mod:`.fast` first, which hands every line it is unsure of back to :func:`_Lines.slow_line`.
"""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .fast import FastLines
from .hashing import BackgroundSha256
from .rows import REQUIRED_COLUMNS, DataError, HeaderError, Shard, ShardBuilder, header_columns

MAX_LINE_BYTES = 1 << 16
"""Longest line (one row, all its columns) a shard may have: 64 KiB; a raw-image row is ~1.1 KB."""
BLOCK_BYTES = 1 << 21  # ~2,000 rows a block: bounds the reader's memory beside the pixels
_BOM = b"\xef\xbb\xbf"
_RAW_ROW_BYTES = 1056  # a raw-image row of a table export, at least: capacity estimate from the file size


def _line_chunks(handle: BinaryIO, digest: BackgroundSha256) -> Iterator[tuple[int, bytes | None]]:
    """(number of the first line, whole lines each ending in ``\\n``), CRLF made LF, BOM dropped.

    A line that grows past :data:`MAX_LINE_BYTES` without a newline is dropped as it streams
    past and yielded as ``(its number, None)``.
    """
    line, rest, dropping, first = 1, b"", False, True
    while block := handle.read(BLOCK_BYTES):
        if block.endswith(b"\r"):
            block += handle.read(1)  # keep a CRLF in one block
        digest.update(block)
        if first and block.startswith(_BOM):
            block = block[len(_BOM) :]
        first = False
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n")
        if dropping:
            newline = block.find(b"\n")
            if newline < 0:
                continue
            yield line, None
            line, dropping, block = line + 1, False, block[newline + 1 :]
        cut = block.rfind(b"\n") + 1
        if cut:
            chunk, rest = rest + block[:cut], block[cut:]
            yield line, chunk
            line += chunk.count(b"\n")
        else:
            rest += block
        if len(rest) > MAX_LINE_BYTES:
            rest, dropping = b"", True
    if dropping:
        yield line, None
    elif rest:
        yield line, rest.removesuffix(b"\r") + b"\n"  # a last line without a newline


def _bad_quote_field(text: str) -> int:
    """Index of the field whose quoting ``csv`` rejected (only called on a malformed line)."""
    field, at_start, quoted, i = 0, True, False, 0
    while i < len(text):
        char = text[i]
        if quoted and char == '"':
            if text[i + 1 : i + 2] == '"':
                i += 2
                continue
            quoted = False
            if text[i + 1 : i + 2] not in ("", ","):
                return field
        elif not quoted and char == '"' and at_start:
            quoted = True
        elif not quoted and char == ",":
            field, at_start, i = field + 1, True, i + 1
            continue
        elif not quoted and char == "\r":
            return field
        at_start = False
        i += 1
    return field


class _Lines:
    """Turns line chunks into rows: the fast path first (if asked), this class's verdict otherwise."""

    def __init__(self, builder: ShardBuilder, fast: bool) -> None:
        self.builder = builder
        self.fast = FastLines(builder, self.slow_line, MAX_LINE_BYTES) if fast else None

    def add(self, line: int, chunk: bytes | None) -> None:
        if chunk is None:
            self.slow_line(line, None)
        elif self.fast is not None:
            self.fast.add(chunk, line)
        else:
            for k, text in enumerate(chunk.split(b"\n")[:-1]):
                self.slow_line(line + k, text)

    def slow_line(self, line: int, raw: bytes | None) -> None:
        """One line, judged field by field; None stands for a line too long to hold."""
        builder = self.builder
        if raw is None or len(raw) > MAX_LINE_BYTES:
            builder.skip(line, f"line is longer than {MAX_LINE_BYTES} bytes, the limit for one row")
            return
        text = _decode(builder.path, line, raw)
        if not text.strip():
            return  # blank lines separate nothing and are allowed
        if '"' not in text and "\r" not in text:
            builder.add_fields(line, text.split(","))
            return
        try:
            fields = next(csv.reader([text], strict=True))
        except csv.Error as error:
            column = builder.column_name(_bad_quote_field(text))
            hint = "; a quote opened in this field is not closed on this line" if "end of data" in str(error) else ""
            builder.skip(line, f"{column}: malformed CSV quoting ({error}{hint})", column)
            return
        builder.add_fields(line, fields)


def _decode(path: Path, line: int, raw: bytes) -> str:
    """The line as text; the error says where the bad byte is, never its value (it may be an image's)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}:{line}: not UTF-8 text (at byte {error.start + 1} of the line); "
                        "expected a UTF-8 CSV file") from None


def _open_regular(path: Path) -> BinaryIO:
    """Open for reading without blocking on a FIFO; anything but a regular file is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
        raise DataError(f"{path}: is {kind}, expected a regular CSV file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _header(path: Path, first: tuple[int, bytes | None] | None) -> tuple[list[str], bytes]:
    """The header's names and the rest of the first chunk."""
    if first is None:
        raise HeaderError(path, f": empty file, expected a header row with {', '.join(REQUIRED_COLUMNS)}")
    _, chunk = first
    if chunk is None:
        raise HeaderError(path, f":1: line is longer than {MAX_LINE_BYTES} bytes, expected a header row")
    newline = chunk.index(b"\n")
    try:
        text = _decode(path, 1, chunk[:newline])
        names = next(csv.reader([text], strict=True), [])
    except DataError as error:
        raise HeaderError(path, str(error).removeprefix(str(path))) from None
    except csv.Error as error:
        raise HeaderError(path, f":1: malformed CSV header ({error})") from None
    return names, chunk[newline + 1 :]


def read_shard(path: str | Path, labels_required: bool = True, *, fast: bool = True) -> Shard:
    """Read one CSV shard; bad rows are skipped and listed, unusable files raise DataError.

    ``fast=False`` sends every line through the general reader: the reference the fast path is
    tested against (same rows, same bad rows), and the slow way round.
    """
    path = Path(path)
    digest = BackgroundSha256()
    try:
        with _open_regular(path) as handle:
            chunks = _line_chunks(handle, digest)
            names, rest = _header(path, next(chunks, None))
            capacity = os.fstat(handle.fileno()).st_size // _RAW_ROW_BYTES + 1
            builder = ShardBuilder(path, capacity, header_columns(path, names), names, labels_required)
            lines = _Lines(builder, fast)
            if rest:
                lines.add(2, rest)
            for line, chunk in chunks:
                lines.add(line, chunk)
        return builder.finish(digest.hexdigest())
    except OSError as error:
        raise DataError(f"{path}: cannot read shard ({error.strerror or error})") from error
    finally:
        digest.close()

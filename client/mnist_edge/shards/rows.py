"""One row's verdict, and the shard it builds: the checks every reader ends in.

Whatever path a row took to get here, :meth:`ShardBuilder.add_row` alone decides whether it is
kept, and its reason when it is not. Reasons and errors reach the server (task errors,
``validation_error``), so they name the file, line and column but never quote an image, and
quote other values only when they are short (:func:`describe`) and only once line 1 is a
shard's header: of any other file nothing is said but its path (:class:`HeaderError`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .codecs import IMAGE_BYTES, IMAGE_SIDE, decode_image

REQUIRED_COLUMNS = ("image_id", "label", "image")
NO_LABEL = -1
"""Label value of an unlabelled row (allowed in predict shards only)."""
WARN_FIRST = 10
"""How many bad rows are logged one by one; the rest are only counted."""
EXCERPT_CHARS = 20
"""Longest value quoted in a message; a longer one is described by its length only."""
_NAMES_SHOWN = 8
_NAME_CHARS = 32
_NAME = re.compile(rf"[\w .-]{{1,{_NAME_CHARS}}}")


class DataError(UserError, ValueError):
    """A shard or data directory cannot be used; the message names the path and the problem."""


class HeaderError(DataError):
    """The first line is not a shard's header, so the file may not be a shard at all (a task's ``data``
    can name any file of the node): the message says nothing about what the file holds. What is
    wrong with the line (the old, fuller message) is :attr:`local_message`, for the command line only.
    """

    def __init__(self, path: Path, local_message: str) -> None:
        super().__init__(f"{path}:1: not a CSV shard: expected line 1 to be a header naming "
                         f"{', '.join(REQUIRED_COLUMNS)} (each once); the file's content is not shown "
                         "(a headerless or empty shard, a misspelt or repeated column, or not a shard)")
        self.local_message = f"{path}{local_message}"


def describe(text: str) -> str:
    """A field value as a message may show it: quoted when short, else only its length."""
    return repr(text) if len(text) <= EXCERPT_CHARS else f"of {len(text)} characters"


@dataclass(frozen=True)
class BadRow:
    """One skipped row: where it is (``column`` is the header name, or None for the whole row) and why."""

    path: str
    line: int
    reason: str
    column: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class Shard:
    """The valid rows of one CSV file, plus what was skipped."""

    path: Path
    image_ids: np.ndarray  # int64 (N,)
    labels: np.ndarray  # int64 (N,), NO_LABEL where unlabelled
    images: np.ndarray  # uint8 (N, 28, 28)
    rows_skipped: int
    bad_rows: list[BadRow]  # the first WARN_FIRST
    sha256: str  # of exactly the bytes these rows were decoded from


def header_columns(path: Path, names: list[str]) -> tuple[int, int, int]:
    """Positions of image_id, label and image in the header; :class:`HeaderError` if it is not one."""
    names = [name.strip() for name in names]
    if not any(names):
        raise HeaderError(path, f":1: blank line, expected a header row with {', '.join(REQUIRED_COLUMNS)}")
    for name in REQUIRED_COLUMNS:
        places = [i + 1 for i, n in enumerate(names) if n == name]
        if len(places) > 1:
            raise HeaderError(path, f":1: column {name!r} appears {len(places)} times (columns "
                                    f"{', '.join(map(str, places))}), expected once")
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise HeaderError(path, f":1: missing required column {missing[0]!r} ({_header_summary(names)})")
    return tuple(names.index(name) for name in REQUIRED_COLUMNS)  # type: ignore[return-value]


def _header_summary(names: list[str]) -> str:
    """What the first line holds, without quoting data: a headerless shard's line 1 is a row.

    Names that look like column names (up to 32 word characters) are listed; others only by length.
    """
    if any(n.isdigit() or len(n) > _NAME_CHARS * 4 for n in names):
        return f"line 1 looks like a data row of {len(names)} fields, not a header"
    shown = [n if _NAME.fullmatch(n) else f"<{len(n)} characters>" for n in names[:_NAMES_SHOWN]]
    more = f", ... ({len(names)} columns)" if len(names) > _NAMES_SHOWN else ""
    return f"header has: {', '.join(shown)}{more}"


def parse_int(text: str) -> int:
    """An optionally signed decimal integer of ASCII digits (``int`` alone accepts ``'٣'`` and ``'1_0'``)."""
    text = text.strip()
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError
    return int(text)


class ShardBuilder:
    """Collects rows into preallocated arrays (peak memory ~ the pixels) and keeps the bad-row list."""

    def __init__(
        self, path: Path, capacity: int, columns: tuple[int, int, int], names: Sequence[str], labels_required: bool
    ) -> None:
        self.path = path
        self.columns = columns
        self.names = list(names)
        self.width = max(columns) + 1
        self.labels_required = labels_required
        self.images = np.empty((capacity, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
        self.image_ids = np.empty(capacity, dtype=np.int64)
        self.labels = np.empty(capacity, dtype=np.int64)
        self.count = 0
        self.rows_skipped = 0
        self.bad_rows: list[BadRow] = []

    def column_name(self, index: int) -> str:
        name = self.names[index].strip() if index < len(self.names) else ""
        return name if name and len(name) <= EXCERPT_CHARS else f"column {index + 1}"

    def skip(self, line: int, reason: str, column: str | None = None) -> None:
        self.rows_skipped += 1
        if len(self.bad_rows) < WARN_FIRST:
            self.bad_rows.append(BadRow(str(self.path), line, reason, column))

    def add_fields(self, line: int, fields: Sequence[str]) -> None:
        """A parsed row of the general reader: too few fields is a bad row, else :meth:`add_row`."""
        if len(fields) < self.width:
            self.skip(line, f"row has {len(fields)} fields, expected at least {self.width}")
            return
        id_col, label_col, image_col = self.columns
        self.add_row(line, fields[id_col], fields[label_col], fields[image_col])

    def add_row(self, line: int, image_id: str, label: str, image: str) -> None:
        """The verdict on one row: the checks in order, the first that fails is the reason."""
        try:
            column = "image_id"
            value = self._image_id(image_id)
            column = "label"
            label_value = self._label(label)
            column = "image"
            pixels = decode_image(image)
        except ValueError as error:
            self.skip(line, str(error), column)
            return
        self.append(pixels.reshape(1, IMAGE_BYTES), np.array([value]), np.array([label_value]))

    @staticmethod
    def _image_id(text: str) -> int:
        try:
            value = parse_int(text)
        except ValueError:
            raise ValueError(f"image_id {describe(text)} is not an integer") from None
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"image_id {describe(text)} does not fit in 64 bits")
        return value

    def _label(self, text: str) -> int:
        if not text.strip():
            if self.labels_required:
                raise ValueError("label is missing")
            return NO_LABEL
        try:
            value = parse_int(text)
        except ValueError:
            raise ValueError(f"label {describe(text)} is not an integer 0-9") from None
        if not 0 <= value <= 9:
            shown = value if len(text.strip()) <= EXCERPT_CHARS else describe(text.strip())
            raise ValueError(f"label {shown} is out of range 0-9")
        return value

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` more rows. Growing is a ``realloc`` of each array (``mremap`` for
        arrays this big on Linux), so the pixels are not copied and the peak stays ~ the pixels."""
        needed = self.count + rows
        if needed > len(self.labels):
            capacity = max(needed, len(self.labels) * 3 // 2 + 1024)
            for array in (self.images, self.image_ids, self.labels):
                array.resize((capacity,) + array.shape[1:], refcheck=False)

    def append(self, pixels: np.ndarray, image_ids: np.ndarray, labels: np.ndarray) -> None:
        start, end = self.count, self.count + len(labels)
        if end > start:
            self.reserve(len(labels))
            self.images[start:end] = pixels.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
            self.image_ids[start:end] = image_ids
            self.labels[start:end] = labels
            self.count = end

    def finish(self, sha256: str) -> Shard:
        n = self.count
        for array in (self.images, self.image_ids, self.labels):
            array.resize((n,) + array.shape[1:], refcheck=False)
        return Shard(self.path, self.image_ids, self.labels, self.images, self.rows_skipped, self.bad_rows, sha256)

"""Reading one CSV shard: base64 images (raw or PNG) decoded fast, every row checked.

A shard is a table export: a header row with ``image_id``, ``label`` and ``image`` (any order,
other columns ignored). ``image`` is base64 of either the 784 raw bytes of a 28x28 grayscale
image or a PNG file. Bad rows are skipped and listed by ``file:line``; a file that cannot be
used at all raises :class:`DataError`. Plain ASCII files take a bulk path (numpy locates the
fields, base64 is decoded in blocks, a worker thread hashes); anything else, and every block
with an unusual row, goes through the row-by-row checks, so both give the same result.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


IMAGE_SIDE = 28
IMAGE_BYTES = IMAGE_SIDE * IMAGE_SIDE
REQUIRED_COLUMNS = ("image_id", "label", "image")
NO_LABEL = -1
"""Label value of an unlabelled row (allowed in predict shards only)."""
WARN_FIRST = 10
"""How many bad rows are logged one by one; the rest are only counted."""

_RAW_B64_LEN = 4 * ((IMAGE_BYTES + 2) // 3)  # 1048 characters, ending in "=="
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_CHUNK_ROWS = 4096
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_LOOKUP = np.full(256, 255, dtype=np.uint8)
_B64_LOOKUP[np.frombuffer(_B64_ALPHABET, dtype=np.uint8)] = np.arange(64, dtype=np.uint8)


def _stdlib_b64decode_strict(data) -> bytes:
    return binascii.a2b_base64(data, strict_mode=True)


try:  # SIMD base64 (AVX2/AVX-512/NEON): ~5x faster than binascii on image blocks; same errors
    import pybase64

    def _b64decode_strict(data) -> bytes:
        """Strict base64 decode of a bytes-like; raises ``binascii.Error`` on any bad character."""
        return pybase64.b64decode(data, validate=True)

except ImportError:  # pragma: no cover - pybase64 is a declared dependency; binascii still works
    _b64decode_strict = _stdlib_b64decode_strict


class DataError(ValueError):
    """A shard or data directory cannot be used; the message names the path and the problem."""


@dataclass(frozen=True)
class BadRow:
    """One skipped row: where it is and why."""

    path: str
    line: int
    reason: str

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
    sha256: str


# -- decoding ---------------------------------------------------------------------------------


_B64_BODY_LEN = _RAW_B64_LEN - 4  # 1044 characters: 261 whole quads, 783 bytes


def _decode_raw_b64_block(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode a (rows, 1048) matrix of base64 bytes at once; returns (pixels (rows, 784), ok-mask)."""
    pixels = np.empty((len(raw), IMAGE_BYTES), dtype=np.uint8)
    ok = _decode_raw_b64(np.ascontiguousarray(raw[:, :_B64_BODY_LEN]), raw[:, _B64_BODY_LEN:], pixels)
    return pixels, ok


def _decode_raw_b64(body: np.ndarray, tail: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Decode raw images into ``pixels`` (rows, 784) from their first 1044 and last 4 characters; returns ok.

    Per-row ``b64decode`` dominates a naive reader. The first 1044 characters of every row are
    whole quads, so one call of a compiled decoder decodes the whole block (``body``, C-contiguous); only the last
    pixel ("xy==") is done with a lookup table. A block with any invalid row takes the lookup table
    for every character, which also says which rows are bad (they then go through
    :func:`decode_image` for the reason).
    """
    rows = len(body)
    last = _B64_LOOKUP[tail[:, :2]]
    ok = (last != 255).all(axis=1) & (tail[:, 2:] == ord("=")).all(axis=1)
    try:
        decoded = _b64decode_strict(body)
        pixels[:, :-1] = np.frombuffer(decoded, dtype=np.uint8).reshape(rows, IMAGE_BYTES - 1)
    except binascii.Error:
        sextets = _B64_LOOKUP[body].reshape(rows, -1, 4)
        ok &= (sextets != 255).all(axis=(1, 2))
        s0, s1, s2, s3 = (sextets[:, :, k] for k in range(4))
        triples = np.stack([(s0 << 2) | (s1 >> 4), (s1 << 4) | (s2 >> 2), (s2 << 6) | s3], axis=-1)
        pixels[:, :-1] = triples.reshape(rows, IMAGE_BYTES - 1)
    pixels[:, -1] = (last[:, 0] << 2) | (last[:, 1] >> 4)
    return ok


def decode_image(text: str) -> np.ndarray:
    """Decode one base64 image (raw 784 bytes or PNG) to uint8 (28, 28); ValueError says why."""
    try:
        blob = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"image is not valid base64 ({error})") from None
    if blob.startswith(_PNG_MAGIC):
        return _decode_png(blob)
    if len(blob) != IMAGE_BYTES:
        raise ValueError(f"image has {len(blob)} bytes, expected {IMAGE_BYTES} raw bytes (28x28) or a PNG")
    return np.frombuffer(blob, dtype=np.uint8).reshape(IMAGE_SIDE, IMAGE_SIDE)


def _decode_png(blob: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
            if image.size != (IMAGE_SIDE, IMAGE_SIDE):
                raise ValueError(f"PNG is {image.size[0]}x{image.size[1]}, expected 28x28")
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"image is not a decodable PNG ({error})") from None


def encode_image(pixels: np.ndarray, fmt: str = "raw") -> str:
    """Base64 of a 28x28 uint8 image as raw bytes or PNG (the inverse of :func:`decode_image`)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(IMAGE_SIDE, IMAGE_SIDE)
    if fmt == "raw":
        return base64.b64encode(pixels.tobytes()).decode("ascii")
    if fmt == "png":
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")
    raise ValueError(f"image format must be 'raw' or 'png', got {fmt!r}")


def _parse_int(text: str) -> int:
    text = text.strip()
    if not text or not (text.isdigit() or (text[0] in "+-" and text[1:].isdigit())):
        raise ValueError
    return int(text)


_Field = str | bytes
"""A field as a reader hands it over: ``str`` from ``csv.reader``, ASCII ``bytes`` from the plain reader."""


def _as_str(text: _Field) -> str:
    return text.decode("ascii") if isinstance(text, bytes) else text


def _int_column(fields: list[_Field]) -> tuple[np.ndarray, np.ndarray]:
    """Plain decimal ids (1-18 ASCII digits) parsed in bulk: (values, ok). Others get the per-row checks."""
    n = len(fields)
    joined = fields[0][:0].join(fields)
    if joined.isascii() and joined.isdigit() and min(map(len, fields)) >= 1 and max(map(len, fields)) <= 18:
        return np.fromiter(map(int, fields), np.int64, n), np.ones(n, dtype=bool)
    ok = np.fromiter((0 < len(t) <= 18 and t.isascii() and t.isdigit() for t in fields), bool, n)
    values = np.zeros(n, dtype=np.int64)
    values[ok] = [int(t) for t, good in zip(fields, ok) if good]
    return values, ok


def _label_column(fields: list[_Field], labels_required: bool) -> tuple[np.ndarray, np.ndarray]:
    """Single-digit labels (and empty ones where allowed) parsed in bulk: (values, ok)."""
    n = len(fields)
    joined = fields[0][:0].join(fields)
    if not joined and not labels_required:
        return np.full(n, NO_LABEL, dtype=np.int64), np.ones(n, dtype=bool)
    if len(joined) == n and max(map(len, fields)) == 1 and joined.isascii() and joined.isdigit():
        codes = np.frombuffer(joined if isinstance(joined, bytes) else joined.encode("ascii"), dtype=np.uint8)
        return codes.astype(np.int64) - ord("0"), np.ones(n, dtype=bool)
    values = np.full(n, NO_LABEL, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    for row, text in enumerate(fields):
        if len(text) == 1 and text.isascii() and text.isdigit():
            values[row], ok[row] = int(text), True
        elif not text and not labels_required:
            ok[row] = True
    return values, ok


def _image_column(fields: list[_Field]) -> tuple[np.ndarray, np.ndarray]:
    """Raw 1048-character images decoded in bulk: (pixels (n, 784), ok). PNG and bad rows are not ok."""
    n = len(fields)
    if min(map(len, fields)) == max(map(len, fields)) == _RAW_B64_LEN:
        try:  # the usual case: all raw and valid. Strict decoding gives 784-786 bytes a row, so
            decoded = b"".join(map(_b64decode_strict, fields))  # the total is 784n only if each is 784
            if len(decoded) == n * IMAGE_BYTES:
                return np.frombuffer(decoded, dtype=np.uint8).reshape(n, IMAGE_BYTES), np.ones(n, dtype=bool)
        except ValueError:  # binascii.Error, or non-ASCII text
            pass
        fast = None
        texts = fields
    else:
        fast = [row for row, text in enumerate(fields) if len(text) == _RAW_B64_LEN]
        texts = [fields[row] for row in fast]
    if not texts:
        return np.empty((n, IMAGE_BYTES), dtype=np.uint8), np.zeros(n, dtype=bool)
    joined = texts[0][:0].join(texts)
    buffer = joined if isinstance(joined, bytes) else joined.encode("ascii", "replace")
    raw = np.frombuffer(buffer, dtype=np.uint8).reshape(len(texts), _RAW_B64_LEN)
    pixels, ok = _decode_raw_b64_block(raw)
    if fast is None:
        return pixels, ok
    all_pixels = np.empty((n, IMAGE_BYTES), dtype=np.uint8)
    all_ok = np.zeros(n, dtype=bool)
    all_pixels[fast], all_ok[fast] = pixels, ok
    return all_pixels, all_ok


# -- reading one shard ------------------------------------------------------------------------

_BOM = b"\xef\xbb\xbf"
_PLAIN_BLOCK_BYTES = 1 << 21  # ~2,000 rows: bounds the reader's memory beside the pixels
_RAW_ROW_BYTES = 1056  # a raw-image row of a table export, at least: capacity estimate from the file size
_NEWLINE, _COMMA, _DIGIT_0 = ord("\n"), ord(","), ord("0")
_MAX_ID_DIGITS = 18  # always fits in int64


class _NotPlain(Exception):
    """The file needs ``csv.reader``: quotes, non-ASCII text, NUL or a bare CR."""


def _is_plain(block: bytes) -> bool:
    """ASCII without quotes, NUL or a CR outside CRLF: CSV parsing is then splitting on commas."""
    return (
        block.isascii() and b'"' not in block and b"\x00" not in block
        and (b"\r" not in block or block.count(b"\r") == block.count(b"\r\n"))
    )


def _count_lines(path: Path) -> int:
    """An upper bound on the rows, so the arrays are allocated once (peak memory ~ the pixels)."""
    lines = 1
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
    return lines


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class _BackgroundSha256:
    """sha256 of the blocks handed to :meth:`update`, computed on a worker thread.

    ``hashlib`` releases the GIL on large buffers, so with a second core the fingerprint costs
    the reader no wall time. At most ``depth`` blocks wait (memory stays bounded on a busy machine).
    """

    def __init__(self, depth: int = 4) -> None:
        self._digest = hashlib.sha256()
        self._blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (block := self._blocks.get()) is not None:
                self._digest.update(block)
        except BaseException as error:  # keep taking blocks so the reader never waits; hexdigest raises
            self._error = error
            while self._blocks.get() is not None:
                pass

    def update(self, block: bytes) -> None:
        self._blocks.put(block)

    def close(self) -> None:
        """Stop the worker once the queued blocks are hashed; idempotent."""
        if self._thread.is_alive():
            self._blocks.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()


def _header_columns(path: Path, header: list[str] | None) -> tuple[int, int, int]:
    if not header:
        raise DataError(f"{path}: empty file, expected a header row with {', '.join(REQUIRED_COLUMNS)}")
    names = [name.strip() for name in header]
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        raise DataError(
            f"{path}: missing required column {missing[0]!r} (header has: {', '.join(names)})"
        )
    return tuple(names.index(name) for name in REQUIRED_COLUMNS)  # type: ignore[return-value]


def _is_blank(row: list[_Field]) -> bool:
    return not row or (len(row) == 1 and not _as_str(row[0]).strip())


class _ShardBuilder:
    """Collects rows chunk by chunk into preallocated arrays (peak memory ~ the pixels)."""

    def __init__(
        self, path: Path, capacity: int, columns: tuple[int, int, int], labels_required: bool
    ) -> None:
        self.path = path
        self.columns = columns
        self.width = max(columns) + 1
        self.labels_required = labels_required
        self.images = np.empty((capacity, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
        self.image_ids = np.empty(capacity, dtype=np.int64)
        self.labels = np.empty(capacity, dtype=np.int64)
        self.count = 0
        self.rows_skipped = 0
        self.bad_rows: list[BadRow] = []

    def skip(self, line: int, reason: str) -> None:
        self.rows_skipped += 1
        if len(self.bad_rows) < WARN_FIRST:
            self.bad_rows.append(BadRow(str(self.path), line, reason))

    def skip_short(self, line: int, row: list[_Field]) -> None:
        self.skip(line, f"row has {len(row)} fields, expected at least {self.width}")

    def _label(self, text: str) -> int:
        if not text.strip():
            if self.labels_required:
                raise ValueError("label is missing")
            return NO_LABEL
        try:
            value = _parse_int(text)
        except ValueError:
            raise ValueError(f"label {text!r} is not an integer 0-9") from None
        if not 0 <= value <= 9:
            raise ValueError(f"label {value} is out of range 0-9")
        return value

    def add_rows(self, lines: Sequence[int], rows: list[list[_Field]]) -> None:
        """Add full-width rows (in line order) from either reader."""
        if rows:
            id_col, label_col, image_col = self.columns
            self.add_chunk(lines, [r[id_col] for r in rows], [r[label_col] for r in rows],
                           [r[image_col] for r in rows])

    def add_chunk(
        self, lines: Sequence[int], ids: list[_Field], labels: list[_Field], images: list[_Field]
    ) -> None:
        """Add rows in line order: clean rows are checked and copied in bulk, the rest one by one."""
        n = len(ids)
        if n == 0:
            return
        id_values, id_ok = _int_column(ids)
        label_values, label_ok = _label_column(labels, self.labels_required)
        pixels, image_ok = _image_column(images)
        start = 0
        for row in [*np.flatnonzero(~(id_ok & label_ok & image_ok)).tolist(), n]:
            self._append(pixels[start:row], id_values[start:row], label_values[start:row])
            if row < n:
                self._add_row(lines[row], ids[row], labels[row], images[row])
            start = row + 1

    def _add_row(self, line: int, image_id: _Field, label: _Field, image: _Field) -> None:
        """The exact checks, in order; the first that fails is the row's reason."""
        id_text = _as_str(image_id)
        try:
            try:
                value = _parse_int(id_text)
            except ValueError:
                raise ValueError(f"image_id {id_text!r} is not an integer") from None
            if not -(2**63) <= value < 2**63:
                raise ValueError(f"image_id {id_text!r} does not fit in 64 bits")
            label_value = self._label(_as_str(label))
            pixels = decode_image(_as_str(image))
        except ValueError as error:
            self.skip(line, str(error))
            return
        self._append(pixels.reshape(1, IMAGE_BYTES), np.array([value]), np.array([label_value]))

    def _reserve(self, rows: int) -> None:
        """Room for ``rows`` more rows. Growing is a ``realloc`` of each array (``mremap`` for
        arrays this big on Linux), so the pixels are not copied and the peak stays ~ the pixels."""
        needed = self.count + rows
        if needed > len(self.labels):
            capacity = max(needed, len(self.labels) * 3 // 2 + 1024)
            for array in (self.images, self.image_ids, self.labels):
                array.resize((capacity,) + array.shape[1:], refcheck=False)

    def add_decoded(
        self, image_ids: np.ndarray, labels: np.ndarray, body: np.ndarray, tail: np.ndarray
    ) -> bool:
        """Add rows whose ids and labels are parsed and whose raw images are still base64
        (:func:`_decode_raw_b64`), decoding straight into the pixel array. If any image is not
        valid, nothing is added and False is returned (the caller then takes the per-row path)."""
        n = len(labels)
        self._reserve(n)
        start, end = self.count, self.count + n
        if not _decode_raw_b64(body, tail, self.images[start:end].reshape(n, IMAGE_BYTES)).all():
            return False
        self.image_ids[start:end] = image_ids
        self.labels[start:end] = labels
        self.count = end
        return True

    def _append(self, pixels: np.ndarray, image_ids: np.ndarray, labels: np.ndarray) -> None:
        start, end = self.count, self.count + len(labels)
        if end > start:
            self._reserve(len(labels))
            self.images[start:end] = pixels.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
            self.image_ids[start:end] = image_ids
            self.labels[start:end] = labels
            self.count = end

    def finish(self, sha256: str) -> Shard:
        n = self.count
        for array in (self.images, self.image_ids, self.labels):
            array.resize((n,) + array.shape[1:], refcheck=False)
        return Shard(self.path, self.image_ids, self.labels, self.images, self.rows_skipped, self.bad_rows, sha256)


def _read_csv(path: Path, capacity: int, labels_required: bool) -> _ShardBuilder:
    """Any UTF-8 CSV (quotes, embedded newlines, non-ASCII), through ``csv.reader``."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        builder = _ShardBuilder(path, capacity, _header_columns(path, next(reader, None)), labels_required)
        lines: list[int] = []
        rows: list[list[str]] = []
        for row in reader:
            if _is_blank(row):
                continue
            if len(row) < builder.width:
                builder.add_rows(lines, rows)  # keep the bad-row list in line order
                lines, rows = [], []
                builder.skip_short(reader.line_num, row)
                continue
            lines.append(reader.line_num)
            rows.append(row)
            if len(rows) >= _CHUNK_ROWS:
                builder.add_rows(lines, rows)
                lines, rows = [], []
        builder.add_rows(lines, rows)
    return builder


def _read_plain(path: Path, labels_required: bool) -> tuple[_ShardBuilder, str]:
    """A plain file (see :func:`_is_plain`) by locating fields in bytes: same fields and line numbers.

    ``csv.reader`` walks every character of every 1048-character image and decodes the file
    to text first; on a plain file the fields are where the commas and newlines are. The file
    is hashed as it is read, on a worker thread. Raises :class:`_NotPlain` at the first block
    that is not plain.
    """
    digest = _BackgroundSha256()
    try:
        with open(path, "rb") as handle:
            head = handle.readline()
            digest.update(head)
            head = head[len(_BOM) :] if head.startswith(_BOM) else head
            if not _is_plain(head):
                raise _NotPlain
            columns = _header_columns(path, next(csv.reader([head.decode("ascii")]), None))
            capacity = os.fstat(handle.fileno()).st_size // _RAW_ROW_BYTES + 1
            builder = _ShardBuilder(path, capacity, columns, labels_required)
            blocks = _PlainBlocks(builder)
            while block := handle.read(_PLAIN_BLOCK_BYTES):
                if block.endswith(b"\r"):
                    block += handle.read(1)  # keep a CRLF in one block
                digest.update(block)
                if not _is_plain(block):
                    raise _NotPlain
                blocks.add(block.replace(b"\r\n", b"\n") if b"\r" in block else block)
            blocks.finish()
            return builder, digest.hexdigest()
    finally:
        digest.close()


class _PlainBlocks:
    """Splits a plain file's blocks into complete lines and hands them to the builder.

    The usual lines (every one has the needed fields, plain decimal ids, one-digit or, where
    allowed, empty labels, 1048-character raw images that all decode) are located with numpy and
    added in bulk, decoding straight into the pixel array; any other run of lines goes line by
    line through :func:`_add_plain_lines`, which finds and reports the bad rows. The byte-flag
    array is reused from block to block (a fresh 2 MB buffer costs page faults on every block).
    """

    def __init__(self, builder: _ShardBuilder) -> None:
        self.builder = builder
        self.line = 2  # the number of the next line
        self.rest = b""  # the start of a line that the next block completes
        self._flags = np.empty(0, dtype=bool)

    def add(self, block: bytes) -> None:
        first, cut = block.find(b"\n") + 1, block.rfind(b"\n") + 1
        if not first:
            self.rest += block
            return
        self._add_text(self.rest + block[:first])  # the line that straddles two blocks
        if cut > first:
            self._add(block, first, cut)
        self.rest = block[cut:]

    def finish(self) -> None:
        if self.rest:
            self._add_text(self.rest + b"\n")
            self.rest = b""

    def _add_text(self, text: bytes) -> None:
        self._add(text, 0, len(text))

    def _add(self, text: bytes, start: int, end: int) -> None:
        """Lines ``text[start:end]`` (``end`` just past a newline)."""
        buffer = np.frombuffer(text, dtype=np.uint8, count=end - start, offset=start)
        lines = self._add_regular(buffer)
        if lines is None:
            texts = text[start:end].split(b"\n")[:-1]
            lines = len(texts)
            _add_plain_lines(self.builder, texts, self.line)
        self.line += lines

    def _positions(self, buffer: np.ndarray, byte: int) -> np.ndarray:
        if len(self._flags) < len(buffer):
            self._flags = np.empty(len(buffer), dtype=bool)
        return np.flatnonzero(np.equal(buffer, byte, out=self._flags[: len(buffer)]))

    def _add_regular(self, buffer: np.ndarray) -> int | None:
        """Add the lines in bulk and return their count, or None (nothing added) if they are not regular."""
        builder = self.builder
        ends = self._positions(buffer, _NEWLINE)
        starts = np.empty_like(ends)
        starts[0], starts[1:] = 0, ends[:-1] + 1
        if int((ends - starts).max()) > csv.field_size_limit():
            return None  # the per-line path raises csv.Error if a field is that long
        commas = self._positions(buffer, _COMMA)
        first = np.searchsorted(commas, starts)
        count = np.searchsorted(commas, ends) - first
        width = builder.width
        if len(commas) == 0 or int(count.min()) < width - 1:
            return None  # short or blank lines

        def field(column: int) -> tuple[np.ndarray, np.ndarray]:
            begin = starts if column == 0 else commas[first + column - 1] + 1
            if column < width - 1:
                return begin, commas[first + column]
            return begin, np.where(count > column, commas[np.minimum(first + column, len(commas) - 1)], ends)

        id_col, label_col, image_col = builder.columns
        image_ids = _digits(buffer, *field(id_col))
        labels = _one_digit_labels(buffer, *field(label_col), builder.labels_required)
        begin, end = field(image_col)
        if image_ids is None or labels is None or not bool((end - begin == _RAW_B64_LEN).all()):
            return None
        windows = np.lib.stride_tricks.sliding_window_view(buffer, _B64_BODY_LEN)
        body = windows[begin]  # (rows, 1044), a C-contiguous copy
        tail = buffer[begin[:, None] + np.arange(_B64_BODY_LEN, _RAW_B64_LEN)]
        return len(ends) if builder.add_decoded(image_ids, labels, body, tail) else None


def _digits(buffer: np.ndarray, begin: np.ndarray, end: np.ndarray) -> np.ndarray | None:
    """Fields of 1-18 ASCII digits as int64, or None if any field is not (as :func:`_int_column`)."""
    lengths = end - begin
    if int(lengths.min()) < 1 or int(lengths.max()) > _MAX_ID_DIGITS:
        return None
    width = int(lengths.max())
    positions = end[:, None] - width + np.arange(width)  # right-aligned: the ones digit last
    inside = positions >= begin[:, None]
    digits = buffer[np.maximum(positions, 0)].astype(np.int64) - _DIGIT_0
    if not bool((((digits >= 0) & (digits <= 9)) | ~inside).all()):
        return None
    return (np.where(inside, digits, 0) * 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)).sum(axis=1)


def _one_digit_labels(
    buffer: np.ndarray, begin: np.ndarray, end: np.ndarray, labels_required: bool
) -> np.ndarray | None:
    """Labels of one ASCII digit (or empty where allowed: NO_LABEL), or None (as :func:`_label_column`)."""
    lengths = end - begin
    empty = lengths == 0
    if int(lengths.max()) > 1 or (labels_required and bool(empty.any())):
        return None
    digits = buffer[np.minimum(begin, len(buffer) - 1)].astype(np.int64) - _DIGIT_0
    if not bool(((digits >= 0) & (digits <= 9) | empty).all()):
        return None
    return np.where(empty, NO_LABEL, digits)


def _add_plain_lines(builder: _ShardBuilder, texts: list[bytes], line: int) -> int:
    """Hand complete lines (line numbers from ``line``) to the builder one by one (bytes split
    into fields); returns the next number."""
    if not texts:
        return line
    limit = csv.field_size_limit()
    if max(map(len, texts)) > limit and any(len(f) > limit for t in texts for f in t.split(b",")):
        raise csv.Error(f"field larger than field limit ({limit})")
    width = builder.width
    rows = [t.split(b",", width) for t in texts]  # fields past the last needed one stay joined
    if min(map(len, rows)) >= width:
        builder.add_rows(range(line, line + len(rows)), rows)
        return line + len(rows)
    start = 0
    for k, row in enumerate(rows):
        if len(row) < width:
            builder.add_rows(range(line + start, line + k), rows[start:k])
            if not _is_blank(row):
                builder.skip_short(line + k, row)
            start = k + 1
    builder.add_rows(range(line + start, line + len(rows)), rows[start:])
    return line + len(rows)


def read_shard(path: str | Path, labels_required: bool = True) -> Shard:
    """Read one CSV shard; bad rows are skipped and listed, unusable files raise DataError."""
    path = Path(path)
    try:
        try:
            builder, sha256 = _read_plain(path, labels_required)
        except _NotPlain:
            builder, sha256 = _read_csv(path, _count_lines(path), labels_required), _sha256(path)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text, expected a CSV file ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise DataError(f"{path}: malformed CSV ({error})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read shard ({error.strerror or error})") from error
    return builder.finish(sha256)

"""The fast path: a block of complete lines checked and decoded with numpy, the usual rows in bulk.

``csv.reader`` walks every character of every 1048-character image; in the usual row (plain
ASCII, no quotes, a decimal id, a one-digit label, a raw image) the fields are simply where the
commas are. This module locates them for a whole block at once and decodes the raw images in
one call of a compiled base64 decoder. It never rejects a row: a line it is not sure of (any
quote, non-ASCII byte, NUL or CR, too few commas, an unusual id or label, a PNG, invalid base64,
an overlong line) goes to the general reader's ``slow_line``, whose verdict is the only one, so
both paths give the same rows and the same bad-row list.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import codecs
from .codecs import IMAGE_BYTES, PNG_MAGIC, RAW_B64_LEN
from .rows import NO_LABEL, ShardBuilder

_NEWLINE, _COMMA, _DIGIT_0 = ord("\n"), ord(","), ord("0")
_MAX_ID_DIGITS = 18  # always fits in int64
_B64_BODY_LEN = RAW_B64_LEN - 4  # 1044 characters: 261 whole quads, 783 bytes
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_LOOKUP = np.full(256, 255, dtype=np.uint8)
_B64_LOOKUP[np.frombuffer(_B64_ALPHABET, dtype=np.uint8)] = np.arange(64, dtype=np.uint8)
_UNUSUAL = np.zeros(256, dtype=bool)  # bytes that make a line the general reader's
_UNUSUAL[128:] = True
_UNUSUAL[[0, ord("\r"), ord('"')]] = True
_PNG_MAGIC = np.frombuffer(PNG_MAGIC, dtype=np.uint8)

SlowLine = Callable[[int, bytes], None]
"""The general reader's per-line verdict: (line number, the line's bytes without its newline)."""


def decode_raw_b64(body: np.ndarray, tail: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Decode raw images into ``pixels`` (rows, 784) from their first 1044 and last 4 characters.

    Returns the rows that are valid raw images: strict base64 ending in ``xy==`` whose bytes do not
    start with the PNG signature (such a blob is a PNG by the codecs' rule). ``body`` is
    C-contiguous whole quads, decoded in one call; the last pixel uses a lookup table. A block with
    any invalid character takes the lookup table for every character, which also says which rows.
    """
    rows = len(body)
    last = _B64_LOOKUP[tail[:, :2]]
    ok = (last != 255).all(axis=1) & (tail[:, 2:] == ord("=")).all(axis=1)
    try:
        decoded = codecs.b64decode_strict(body)
        pixels[:, :-1] = np.frombuffer(decoded, dtype=np.uint8).reshape(rows, IMAGE_BYTES - 1)
    except ValueError:  # binascii.Error
        sextets = _B64_LOOKUP[body].reshape(rows, -1, 4)
        ok &= (sextets != 255).all(axis=(1, 2))
        s0, s1, s2, s3 = (sextets[:, :, k] for k in range(4))
        triples = np.stack([(s0 << 2) | (s1 >> 4), (s1 << 4) | (s2 >> 2), (s2 << 6) | s3], axis=-1)
        pixels[:, :-1] = triples.reshape(rows, IMAGE_BYTES - 1)
    pixels[:, -1] = (last[:, 0] << 2) | (last[:, 1] >> 4)
    return ok & ~(pixels[:, : len(PNG_MAGIC)] == _PNG_MAGIC).all(axis=1)


def _digits(buffer: np.ndarray, begin: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fields of 1-18 ASCII digits as int64: (values, ok)."""
    lengths = end - begin
    ok = (lengths >= 1) & (lengths <= _MAX_ID_DIGITS)
    width = int(lengths[ok].max()) if ok.any() else 0
    positions = end[:, None] - width + np.arange(width)  # right-aligned: the ones digit last
    inside = positions >= begin[:, None]
    digits = buffer[np.clip(positions, 0, len(buffer) - 1)].astype(np.int64) - _DIGIT_0
    ok &= (((digits >= 0) & (digits <= 9)) | ~inside).all(axis=1)
    values = (np.where(inside & ok[:, None], digits, 0) * 10 ** np.arange(width - 1, -1, -1, dtype=np.int64))
    return values.sum(axis=1), ok


def _labels(buffer: np.ndarray, begin: np.ndarray, end: np.ndarray, required: bool) -> tuple[np.ndarray, np.ndarray]:
    """One ASCII digit, or empty where allowed (NO_LABEL): (values, ok)."""
    lengths = end - begin
    digits = buffer[np.clip(begin, 0, len(buffer) - 1)].astype(np.int64) - _DIGIT_0
    digit = (lengths == 1) & (digits >= 0) & (digits <= 9)
    empty = (lengths == 0) & (not required)
    return np.where(digit, digits, NO_LABEL), digit | empty


class FastLines:
    """Adds blocks of complete lines to a builder; reuses its scratch buffers from block to block."""

    def __init__(self, builder: ShardBuilder, slow_line: SlowLine, max_line_bytes: int) -> None:
        self.builder = builder
        self.slow_line = slow_line
        self.max_line_bytes = max_line_bytes
        self._flags = np.empty(0, dtype=bool)

    def _positions(self, buffer: np.ndarray, byte: int) -> np.ndarray:
        if len(self._flags) < len(buffer):
            self._flags = np.empty(len(buffer), dtype=bool)
        return np.flatnonzero(np.equal(buffer, byte, out=self._flags[: len(buffer)]))

    def add(self, text: bytes, line: int) -> None:
        """``text``: whole lines, each ending in ``\\n`` (no CR before it), the first numbered ``line``."""
        buffer = np.frombuffer(text, dtype=np.uint8)
        ends = self._positions(buffer, _NEWLINE)
        starts = np.empty_like(ends)
        starts[0], starts[1:] = 0, ends[:-1] + 1
        clean = (ends - starts) <= self.max_line_bytes
        if not (text.isascii() and b'"' not in text and b"\x00" not in text and b"\r" not in text):
            clean[np.searchsorted(ends, np.flatnonzero(_UNUSUAL[buffer]))] = False
        commas = self._positions(buffer, _COMMA)
        width = self.builder.width
        first = np.searchsorted(commas, starts)
        count = np.searchsorted(commas, ends) - first
        clean &= count >= width - 1
        if len(commas) == 0 or not clean.any():  # nothing for the bulk path
            return self._commit(text, line, starts, ends, clean, None, None, None)

        def comma(index: np.ndarray) -> np.ndarray:
            return commas[np.clip(index, 0, len(commas) - 1)]

        def field(column: int) -> tuple[np.ndarray, np.ndarray]:
            begin = starts if column == 0 else comma(first + column - 1) + 1
            end = np.where(count > column, comma(first + column), ends)
            return begin, end

        id_col, label_col, image_col = self.builder.columns
        image_ids, ok = _digits(buffer, *field(id_col))
        labels, label_ok = _labels(buffer, *field(label_col), self.builder.labels_required)
        begin, end = field(image_col)
        clean &= ok & label_ok & (end - begin == RAW_B64_LEN)
        rows = np.flatnonzero(clean)
        if not len(rows):
            return self._commit(text, line, starts, ends, clean, None, None, None)
        builder = self.builder
        if len(rows) == len(ends):  # the usual block: decode straight into the shard's pixel array
            builder.reserve(len(rows))
            pixels = builder.images[builder.count : builder.count + len(rows)].reshape(-1, IMAGE_BYTES)
        else:
            pixels = np.empty((len(rows), IMAGE_BYTES), dtype=np.uint8)
        windows = np.lib.stride_tricks.sliding_window_view(buffer, _B64_BODY_LEN)
        body = windows[begin[rows]]  # (rows, 1044), a C-contiguous copy
        tail = buffer[begin[rows][:, None] + np.arange(_B64_BODY_LEN, RAW_B64_LEN)]
        decoded_ok = decode_raw_b64(body, tail, pixels)
        if len(rows) == len(ends) and decoded_ok.all():
            start = builder.count
            builder.image_ids[start : start + len(rows)] = image_ids
            builder.labels[start : start + len(rows)] = labels
            builder.count += len(rows)
            return None
        all_pixels = np.empty((len(ends), IMAGE_BYTES), dtype=np.uint8)
        all_pixels[rows] = pixels
        clean[rows] = decoded_ok
        return self._commit(text, line, starts, ends, clean, all_pixels, image_ids, labels)

    def _commit(self, text: bytes, line: int, starts: np.ndarray, ends: np.ndarray, clean: np.ndarray,
                pixels: np.ndarray | None, image_ids: np.ndarray | None, labels: np.ndarray | None) -> None:
        """Clean rows in bulk and the others through ``slow_line``, in line order."""
        start = 0
        for row in [*np.flatnonzero(~clean).tolist(), len(ends)]:
            if row > start and pixels is not None:
                self.builder.append(pixels[start:row], image_ids[start:row], labels[start:row])
            if row < len(ends):
                self.slow_line(line + row, text[starts[row] : ends[row]])
            start = row + 1

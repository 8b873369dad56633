"""Local image shards: CSV files with base64 images, read fast, checked row by row, cached.

A shard is a table export: a header row with ``image_id``, ``label`` and ``image`` (any order,
other columns ignored). ``image`` is base64 of either the 784 raw bytes of a 28x28 grayscale
image or a PNG file. Bad rows are skipped and reported by ``file:line``; a file that cannot be
used at all raises :class:`DataError`. Images stay uint8; normalisation happens per batch.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("mnist_edge")

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


@dataclass
class Dataset:
    """The union of a split's shards, as used for one task."""

    images: np.ndarray
    labels: np.ndarray
    image_ids: np.ndarray
    files: list[Path]
    rows_skipped: int
    bad_rows: list[BadRow]
    fingerprint: str
    duplicate_image_ids: int = 0
    shards: list[Shard] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def has_labels(self) -> bool:
        return bool(len(self.labels)) and bool(np.all(self.labels != NO_LABEL))


# -- decoding ---------------------------------------------------------------------------------


def _decode_raw_b64_block(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Decode many 1048-character base64 strings at once; returns (pixels, ok-mask).

    Per-row ``b64decode`` dominates a naive reader; a lookup table over one (rows, 1048)
    byte matrix decodes a whole chunk in a few numpy operations.
    """
    raw = np.frombuffer("".join(texts).encode("ascii", "replace"), dtype=np.uint8)
    raw = raw.reshape(len(texts), _RAW_B64_LEN)
    sextets = _B64_LOOKUP[raw[:, : _RAW_B64_LEN - 2]]
    ok = (sextets != 255).all(axis=1) & (raw[:, -2:] == ord("=")).all(axis=1)
    quads = np.zeros((len(texts), _RAW_B64_LEN // 4, 4), dtype=np.uint8)
    quads.reshape(len(texts), -1)[:, : _RAW_B64_LEN - 2] = sextets
    out = np.empty((len(texts), _RAW_B64_LEN // 4, 3), dtype=np.uint8)
    out[:, :, 0] = (quads[:, :, 0] << 2) | (quads[:, :, 1] >> 4)
    out[:, :, 1] = (quads[:, :, 1] << 4) | (quads[:, :, 2] >> 2)
    out[:, :, 2] = (quads[:, :, 2] << 6) | quads[:, :, 3]
    return out.reshape(len(texts), -1)[:, :IMAGE_BYTES], ok


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


# -- reading one shard ------------------------------------------------------------------------


def _scan(path: Path) -> tuple[int, str]:
    """Line count (an upper bound on rows) and sha256 of the file, in one pass."""
    digest = hashlib.sha256()
    lines = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            lines += block.count(b"\n")
    return lines + 1, digest.hexdigest()


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


class _ShardBuilder:
    """Collects rows chunk by chunk into preallocated arrays (peak memory ~ the pixels)."""

    def __init__(self, path: Path, capacity: int, labels_required: bool) -> None:
        self.path = path
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

    def add_chunk(self, lines: list[int], ids: list[str], labels: list[str], images: list[str]) -> None:
        fast = [i for i, text in enumerate(images) if len(text) == _RAW_B64_LEN]
        pixels = np.empty((0, IMAGE_BYTES), dtype=np.uint8)
        fast_ok = np.zeros(0, dtype=bool)
        if fast:
            pixels, fast_ok = _decode_raw_b64_block([images[i] for i in fast])
        fast_slot = {row: k for k, row in enumerate(fast)}
        for row, line in enumerate(lines):
            try:
                try:
                    image_id = _parse_int(ids[row])
                except ValueError:
                    raise ValueError(f"image_id {ids[row]!r} is not an integer") from None
                label = self._label(labels[row])
                slot = fast_slot.get(row)
                if slot is not None and fast_ok[slot]:
                    self.images[self.count] = pixels[slot].reshape(IMAGE_SIDE, IMAGE_SIDE)
                else:
                    self.images[self.count] = decode_image(images[row])
            except ValueError as error:
                self.skip(line, str(error))
                continue
            self.image_ids[self.count] = image_id
            self.labels[self.count] = label
            self.count += 1

    def finish(self, sha256: str) -> Shard:
        n = self.count
        for array in (self.images, self.image_ids, self.labels):
            array.resize((n,) + array.shape[1:], refcheck=False)
        return Shard(self.path, self.image_ids, self.labels, self.images, self.rows_skipped, self.bad_rows, sha256)


def read_shard(path: str | Path, labels_required: bool = True) -> Shard:
    """Read one CSV shard; bad rows are skipped and listed, unusable files raise DataError."""
    path = Path(path)
    try:
        capacity, sha256 = _scan(path)
    except OSError as error:
        raise DataError(f"{path}: cannot read shard ({error.strerror or error})") from error
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            id_col, label_col, image_col = _header_columns(path, next(reader, None))
            width = max(id_col, label_col, image_col) + 1
            builder = _ShardBuilder(path, capacity, labels_required)
            chunk: tuple[list[int], list[str], list[str], list[str]] = ([], [], [], [])
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) < width:
                    builder.skip(reader.line_num, f"row has {len(row)} fields, expected at least {width}")
                    continue
                chunk[0].append(reader.line_num)
                chunk[1].append(row[id_col])
                chunk[2].append(row[label_col])
                chunk[3].append(row[image_col])
                if len(chunk[0]) >= _CHUNK_ROWS:
                    builder.add_chunk(*chunk)
                    chunk = ([], [], [], [])
            if chunk[0]:
                builder.add_chunk(*chunk)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text, expected a CSV file ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise DataError(f"{path}: malformed CSV ({error})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read shard ({error.strerror or error})") from error
    return builder.finish(sha256)


# -- splits, cache, fingerprint ---------------------------------------------------------------

_shard_cache: dict[tuple[str, bool], tuple[tuple[int, int], Shard]] = {}


def _stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def cached_shard(path: Path, labels_required: bool) -> tuple[Shard, bool]:
    """The shard from the in-process cache, re-read only if the file changed; (shard, was_read)."""
    key = (str(path.resolve()), labels_required)
    try:
        stamp = _stat_key(path)
    except OSError as error:
        raise DataError(f"{path}: cannot read shard ({error.strerror or error})") from error
    hit = _shard_cache.get(key)
    if hit and hit[0] == stamp:
        return hit[1], False
    shard = read_shard(path, labels_required)
    _shard_cache[key] = (stamp, shard)
    return shard, True


def clear_cache() -> None:
    """Forget every decoded shard (tests and benchmarks use this to measure cold reads)."""
    _shard_cache.clear()
    _dataset_cache.clear()


def shard_files(location: str | Path) -> list[Path]:
    """The CSV shards at ``location``: a ``.csv`` file, or the ``*.csv`` files of a directory."""
    location = Path(location)
    if location.is_file():
        return [location]
    if location.is_dir():
        files = sorted(p for p in location.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
        if not files:
            raise DataError(f"{location}: no *.csv shards in this directory")
        return files
    raise DataError(f"{location}: no such file or directory")


def split_location(data_dir: str | Path, split: str) -> Path:
    """``DATA/split/`` (a directory of shards), or ``DATA/split.csv`` as a single shard."""
    data_dir = Path(data_dir)
    directory = data_dir / split
    single = data_dir / f"{split}.csv"
    if not directory.exists() and single.is_file():
        return single
    return directory


_dataset_cache: dict[tuple[tuple[str, ...], bool], tuple[tuple, Dataset]] = {}


def load_dataset(location: str | Path, labels_required: bool = True) -> Dataset:
    """All valid rows under ``location``; reports bad rows; raises DataError if none are valid."""
    files = shard_files(location)
    key = (tuple(str(p.resolve()) for p in files), labels_required)
    results = [cached_shard(p, labels_required) for p in files]
    shards = [shard for shard, _ in results]
    stamp = tuple(id(shard) for shard in shards)
    hit = _dataset_cache.get(key)
    if hit and hit[0] == stamp:
        return hit[1]
    for shard, was_read in results:
        if was_read:
            _report(shard)
    dataset = _combine(Path(location), shards)
    _dataset_cache[key] = (stamp, dataset)
    return dataset


def _report(shard: Shard) -> None:
    for bad in shard.bad_rows:
        log.warning("skipped row %s", bad)
    if shard.rows_skipped > len(shard.bad_rows):
        log.warning("%s: %d more rows skipped", shard.path, shard.rows_skipped - len(shard.bad_rows))


def _combine(location: Path, shards: list[Shard]) -> Dataset:
    total = sum(len(s.labels) for s in shards)
    skipped = sum(s.rows_skipped for s in shards)
    if total == 0:
        raise DataError(
            f"{location}: no valid rows ({skipped} rows skipped"
            + (f"; first: {shards[0].bad_rows[0]}" if shards and shards[0].bad_rows else "")
            + ")"
        )
    if len(shards) == 1:
        images, labels, ids = shards[0].images, shards[0].labels, shards[0].image_ids
    else:
        images = np.concatenate([s.images for s in shards])
        labels = np.concatenate([s.labels for s in shards])
        ids = np.concatenate([s.image_ids for s in shards])
    duplicates = int(len(ids) - len(np.unique(ids)))
    if duplicates:
        log.warning("%s: %d rows repeat an image_id already seen", location, duplicates)
    fingerprint = hashlib.sha256("".join(s.sha256 for s in shards).encode("ascii")).hexdigest()
    bad_rows = [bad for s in shards for bad in s.bad_rows][:WARN_FIRST]
    return Dataset(images, labels, ids, [s.path for s in shards], skipped, bad_rows, fingerprint, duplicates, shards)


def load_split(data_dir: str | Path, split: str, labels_required: bool = True) -> Dataset:
    """The ``train``/``test``/``predict`` split of a node's data directory."""
    return load_dataset(split_location(data_dir, split), labels_required)


def has_split(data_dir: str | Path, split: str) -> bool:
    return split_location(data_dir, split).exists()


def data_dir_from_env() -> Path:
    """``$SCALEOUT_DATA_DIR`` (default ``data``), relative to the working directory."""
    return Path(os.environ.get("SCALEOUT_DATA_DIR", "data"))


# -- writing ----------------------------------------------------------------------------------


def write_shard(
    path: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    image_ids: np.ndarray | None = None,
    fmt: str = "raw",
) -> Path:
    """Write a shard in the table-export layout (extra columns included, as real exports have)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if image_ids is None:
        image_ids = np.arange(len(labels))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image_id", "label", "image", "start_datetime", "end_datetime", "location"])
        for image_id, label, pixels in zip(image_ids, labels, images):
            label_text = "" if int(label) == NO_LABEL else int(label)
            writer.writerow([int(image_id), label_text, encode_image(pixels, fmt), "", "", ""])
    return path

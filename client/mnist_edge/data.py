"""A node's data: splits of CSV shards, cached across rounds, fingerprinted; shard writing.

Reading one file is :mod:`mnist_edge.shards`; this module finds a split's shards, keeps decoded
shards in the process until a file changes, combines them into one :class:`Dataset` with a
fingerprint of the exact contents used, reports bad rows once, and writes shards and prediction
files in the same layout.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .shards import (  # noqa: F401  (re-exported: callers use data.X for the shard format too)
    IMAGE_BYTES,
    IMAGE_SIDE,
    NO_LABEL,
    REQUIRED_COLUMNS,
    WARN_FIRST,
    BadRow,
    DataError,
    Shard,
    decode_image,
    encode_image,
    read_shard,
)

log = logging.getLogger("mnist_edge")


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


def write_predictions(path: Path, image_ids: np.ndarray, predicted: np.ndarray, confidence: np.ndarray) -> Path:
    """The prediction-result schema: ``image_id,label,confidence`` (label = predicted digit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image_id", "label", "confidence"])
        writer.writerows(zip(image_ids.tolist(), predicted.tolist(), np.round(confidence.astype(np.float64), 6).tolist()))
    return path

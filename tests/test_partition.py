"""Partitioning real MNIST labels over clients, and `prepare --partition` writing them to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mnist_edge import data
from mnist_edge import partition as partition_module
from mnist_edge.cli import main
from mnist_edge.partition import MIN_CLIENT_IMAGES, PartitionError, partition


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's digit mix and the overall mix."""
    overall = np.bincount(labels, minlength=10) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - overall).sum()
                          for p in parts]))


def check_disjoint(parts: list[np.ndarray], n: int) -> np.ndarray:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "an image was given to two clients"
    assert joined.min() >= 0 and joined.max() < n
    return joined


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    from mnist_edge.prepare import load_mnist5k

    return load_mnist5k()[1]


def test_iid_deals_every_image_once_in_near_equal_parts(labels):
    parts = partition(labels, 3, "iid", np.random.default_rng(0))
    assert sorted(len(p) for p in parts) == [1666, 1667, 1667]
    assert len(check_disjoint(parts, len(labels))) == len(labels)
    assert label_skew(labels, parts) < 0.05


@pytest.mark.parametrize("scheme, options", [("iid", {}), ("dirichlet", {"alpha": 0.5}),
                                             ("shards", {"classes_per_client": 2})])
def test_same_seed_same_split_other_seed_other_split(labels, scheme, options):
    first = partition(labels, 4, scheme, np.random.default_rng(7), **options)
    again = partition(labels, 4, scheme, np.random.default_rng(7), **options)
    other = partition(labels, 4, scheme, np.random.default_rng(8), **options)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_small_alpha_skews_labels_and_large_alpha_does_not(labels):
    skewed = partition(labels, 5, "dirichlet", np.random.default_rng(0), alpha=0.1)
    mild = partition(labels, 5, "dirichlet", np.random.default_rng(0), alpha=100.0)
    assert len(check_disjoint(skewed, len(labels))) == len(labels)
    assert min(len(p) for p in skewed) >= MIN_CLIENT_IMAGES
    assert label_skew(labels, skewed) > 0.4
    assert label_skew(labels, mild) < 0.1
    # with alpha 0.1 most clients miss at least one digit almost entirely
    assert sum(np.bincount(labels[p], minlength=10).min() < 10 for p in skewed) >= 3


def test_dirichlet_leaves_no_client_empty_even_with_many_clients(labels):
    parts = partition(labels, 40, "dirichlet", np.random.default_rng(3), alpha=0.3)
    assert len(parts) == 40
    assert min(len(p) for p in parts) >= MIN_CLIENT_IMAGES


def test_shards_give_each_client_exactly_k_digits(labels):
    parts = partition(labels, 5, "shards", np.random.default_rng(0), classes_per_client=2)
    assert [len(np.unique(labels[p])) for p in parts] == [2] * 5
    assert len(check_disjoint(parts, len(labels))) == len(labels)  # 5 x 2 = 10: every digit has a holder
    assert sorted(len(p) for p in parts) == [1000] * 5


@pytest.mark.parametrize("scheme, options, message", [
    ("dirichlet", {}, "needs --alpha"),
    ("dirichlet", {"alpha": 0.0}, "A > 0, got 0.0"),
    ("dirichlet", {"alpha": -1.0}, "A > 0, got -1.0"),
    ("iid", {"alpha": 0.5}, "--alpha applies to --partition dirichlet only"),
    ("shards", {}, "needs --classes-per-client"),
    ("shards", {"classes_per_client": 0}, "between 1 and 10 (the digits present), got 0"),
    ("shards", {"classes_per_client": 11}, "got 11"),
    ("dirichlet", {"classes_per_client": 2, "alpha": 1.0}, "applies to --partition shards only"),
    ("random", {}, "must be one of iid, dirichlet, shards, got 'random'"),
])
def test_bad_arguments_are_rejected_with_the_value(labels, scheme, options, message):
    with pytest.raises(PartitionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        partition(labels, 4, scheme, np.random.default_rng(0), **options)


def test_too_many_clients_or_impossible_skew_is_refused(labels, monkeypatch):
    monkeypatch.setattr(partition_module, "DIRICHLET_TRIES", 20)  # the refusal, not the wait
    with pytest.raises(PartitionError, match="5000 images cannot give 501 clients 10 images each"):
        partition(labels, 501, "iid", np.random.default_rng(0))
    with pytest.raises(PartitionError, match="in 20 draws; use a larger --alpha or fewer --clients"):
        partition(labels, 400, "dirichlet", np.random.default_rng(0), alpha=0.001)
    with pytest.raises(PartitionError, match="--clients must be >= 1, got 0"):
        partition(labels, 0, "iid", np.random.default_rng(0))


# -- prepare --partition: files on disk ------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_npz(tmp_path_factory) -> str:
    """A Keras-layout mnist.npz holding 600 real MNIST images (keeps the shards small)."""
    from mnist_edge.prepare import load_mnist5k

    images, labels = load_mnist5k()
    pick = np.random.default_rng(0).permutation(len(labels))[:600]
    path = tmp_path_factory.mktemp("source") / "mnist.npz"
    np.savez(path, x_train=images[pick[:500]], y_train=labels[pick[:500]],
             x_test=images[pick[500:]], y_test=labels[pick[500:]])
    return str(path)


def test_prepare_dirichlet_writes_shards_and_histograms(tmp_path, keras_npz, capsys):
    out = tmp_path / "clients"
    assert main(["prepare", "--source", keras_npz, "--clients", "3", "--out", str(out),
                 "--partition", "dirichlet", "--alpha", "0.5", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "partition.json").read_text())
    assert record["partition"] == "dirichlet" and record["alpha"] == 0.5 and record["images_unused"] == 0
    assert len(record["clients"]) == 3
    for i, client in enumerate(record["clients"]):
        train = data.load_split(out / f"client-{i}", "train")
        test = data.load_split(out / f"client-{i}", "test")
        assert (len(train), len(test)) == (client["train"], client["test"])
        assert len(test) == round(0.2 * (len(train) + len(test)))
        both = np.concatenate([train.labels, test.labels])
        assert np.bincount(both, minlength=10).tolist() == client["labels"]
        assert f"client-{i}" in printed and " ".join(f"{c:>5}" for c in client["labels"]) in printed
    assert sum(c["train"] + c["test"] for c in record["clients"]) == 600


def test_prepare_same_seed_same_files(tmp_path, keras_npz):
    args = ["prepare", "--source", keras_npz, "--clients", "2",
            "--partition", "shards", "--classes-per-client", "3"]
    main([*args, "--out", str(tmp_path / "a")])
    main([*args, "--out", str(tmp_path / "b")])
    for path in sorted((tmp_path / "a").rglob("*.csv")):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
    assert len(list((tmp_path / "a").rglob("shard-*.csv"))) == 4
    record = json.loads((tmp_path / "a" / "partition.json").read_text())
    assert [sum(1 for c in client["labels"] if c) for client in record["clients"]] == [3, 3]
    assert record["images_unused"] == 600 - sum(c["train"] + c["test"] for c in record["clients"]) > 0


def test_prepare_bad_partition_arguments_exit_2_with_message(tmp_path, keras_npz, capsys):
    out = str(tmp_path / "clients")
    args = ["prepare", "--source", keras_npz, "--clients", "2", "--out", out, "--partition", "dirichlet"]
    assert main(args) == 2
    assert "error: --partition dirichlet needs --alpha A with A > 0, got None" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        main(["prepare", "--clients", "2", "--out", out, "--partition", "label-skew"])
    assert raised.value.code == 2
    assert "invalid choice: 'label-skew'" in capsys.readouterr().err
    assert not (tmp_path / "clients").exists()


def test_prepare_refuses_to_mix_with_an_earlier_larger_run(tmp_path, keras_npz, capsys):
    out = str(tmp_path / "clients")
    assert main(["prepare", "--source", keras_npz, "--clients", "3", "--out", out]) == 0
    assert main(["prepare", "--source", keras_npz, "--clients", "3", "--out", out, "--seed", "5"]) == 0
    assert main(["prepare", "--source", keras_npz, "--clients", "2", "--out", out]) == 2
    assert "holds client-2 from an earlier run with more clients" in capsys.readouterr().err

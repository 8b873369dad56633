"""What leaves a task: plain JSON values only, and a train task's metadata in its one shape."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mnist_edge import data, report
from mnist_edge.settings import capped_batch_size, parse_settings
from mnist_edge.training import TrainResult


def test_every_value_becomes_plain_json():
    """numpy scalars become Python numbers, tuples lists, keys text, a path its text; NaN and infinity
    (which JSON cannot carry and a server would refuse) become null, nested at any depth."""
    value = {"loss": np.float32(0.25), "count": np.int64(7), "ok": np.bool_(True), 3: (1, [np.float64(math.inf)]),
             "nested": {"nan": math.nan, "path": Path("/data/train"), "none": None, "text": "x", "minus": -math.inf}}
    plain = report.json_safe(value)
    assert plain == {"loss": 0.25, "count": 7, "ok": True, "3": [1, [None]],
                     "nested": {"nan": None, "path": "/data/train", "none": None, "text": "x", "minus": None}}
    assert [type(plain[k]) for k in ("loss", "count", "ok")] == [float, int, bool]
    assert json.loads(json.dumps(plain, allow_nan=False)) == plain


@pytest.fixture
def dataset(tmp_path, mnist5k) -> data.Dataset:
    images, labels = mnist5k
    path = data.write_shard(tmp_path / "train" / "s.csv", images[:40], labels[:40])
    path.write_text(path.read_text() + "99,3,!!,,,\n")  # one bad row
    return data.load_split(tmp_path, "train")


def test_the_training_metadata_says_what_ran_on_what_data(dataset):
    """Every key a server or a data owner reads, with the values of the run, the settings used and the data:
    ``num_examples`` weights FedAvg, the fingerprint names the exact shards, the privacy keys come along."""
    requested = parse_settings({"epochs": 2, "batch_size": 64, "learning_rate": 0.5, "optimizer": "sgd", "seed": 3,
                                "precision": "fp32"})
    used = capped_batch_size(requested, len(dataset))
    result = TrainResult(num_examples=40, training_loss=np.float32(0.5), training_accuracy=0.75, batches=2,
                         precision="fp32")
    metadata = report.training_metadata(result, used, requested, dataset, {"dp_epsilon_round": np.float64(1.5)})
    assert metadata == {
        "num_examples": 40, "epochs": 2, "batch_size": 40, "batch_size_requested": 64, "learning_rate": 0.5,
        "optimizer": "sgd", "precision": "fp32", "seed": 3, "training_loss": 0.5, "training_accuracy": 0.75,
        "rows_skipped": 1, "duplicate_image_ids": 0, "data_fingerprint": dataset.fingerprint,
        "dp_epsilon_round": 1.5,
    }
    assert json.loads(json.dumps(metadata, allow_nan=False)) == metadata


def test_a_batch_that_fit_the_data_is_not_reported_as_requested(dataset):
    """``batch_size_requested`` appears only when the batch asked for was larger than the split."""
    settings = parse_settings({"batch_size": 16})
    result = TrainResult(40, math.nan, 0.0, 3, "bf16")
    metadata = report.training_metadata(result, capped_batch_size(settings, len(dataset)), settings, dataset, {})
    assert metadata["batch_size"] == 16 and "batch_size_requested" not in metadata
    assert metadata["training_loss"] is None and metadata["precision"] == "bf16" and metadata["seed"] is None

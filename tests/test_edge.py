"""startup.py and the callbacks, driven through a real scaleout.EdgeClient with an injected runtime.

The package is loaded the way ``scaleout client start`` loads it (ImporterPackageRuntime), so
these tests see the same sys.path and working-directory conditions as a real node.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys

import numpy as np
import pytest
from scaleout import EdgeClient, ScaleoutModel
from scaleout.client.importer_package_runtime import ImporterPackageRuntime
from scaleout.client.logging_context import LoggingContext
from scaleout.client.task_receiver import StoppedException

from conftest import CLIENT_DIR, CLIENT_LINE, NUMPY_HELPER, auto_precision_here, shards_fingerprint
from mnist_edge import container, data, edge, model, runtime
from mnist_edge.model import ModelFileError
from mnist_edge.settings import SettingsError


class RecordingRuntime(runtime.LocalRuntime):
    """The in-process runtime, plus an abort raised at a chosen abort check (like the server's)."""

    def __init__(self, abort_at_check: int | None = None) -> None:
        super().__init__()
        self.abort_at_check = abort_at_check
        self.checks = 0

    def check_task_abort(self) -> None:
        self.checks += 1
        if self.abort_at_check is not None and self.checks >= self.abort_at_check:
            raise StoppedException("Aborted by server")


def start(tmp_path, monkeypatch, data_dir=None):
    """A client started from a copy of client/ exactly as `scaleout client start` does it, in
    ``tmp_path/work`` with ``SCALEOUT_DATA_DIR`` set to ``data_dir`` (unset when None)."""
    package = tmp_path / "package"
    shutil.copytree(CLIENT_DIR, package, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    monkeypatch.chdir(workdir)
    if data_dir is None:
        monkeypatch.delenv("SCALEOUT_DATA_DIR", raising=False)
    else:
        monkeypatch.setenv("SCALEOUT_DATA_DIR", str(data_dir))
    runtime = RecordingRuntime()
    client = EdgeClient(runtime=runtime)
    package_runtime = ImporterPackageRuntime(None, None)
    assert package_runtime.load_local_compute_package(str(package))
    path_before = list(sys.path)
    assert package_runtime.run_startup(client)
    assert sys.path == path_before and str(package) not in sys.path
    return client, runtime


@pytest.fixture
def started(tmp_path, monkeypatch, node_dir):
    """A client started on ``node_dir``."""
    return start(tmp_path, monkeypatch, node_dir)


def seed_model(seed_path) -> ScaleoutModel:
    return ScaleoutModel.from_training_model(model.load_npz(seed_path), NUMPY_HELPER)


def call(client: EdgeClient, callback, *args):
    with client.logging_context(LoggingContext(model_id="m", round_id="r1", session_id="s")):
        return callback(*args)


def test_startup_registers_train_validate_and_predict(started):
    client, _ = started
    assert client.train_callback is not None
    assert client.validate_callback is not None
    assert client.inference_callback is not None


@pytest.mark.slow
def test_one_local_epoch_raises_test_accuracy_on_real_mnist(started, seed_path, node_dir):
    client, runtime = started
    seed = seed_model(seed_path)
    before = call(client, client.validate_callback, seed)
    updated, meta = call(client, client.train_callback, seed, {"epochs": 1, "seed": 1})
    after = call(client, client.validate_callback, updated)

    assert before["test_accuracy"] < 0.3
    assert after["test_accuracy"] > 0.6 and after["test_accuracy"] > before["test_accuracy"] + 0.4
    assert after["num_train_examples"] == 1000 and after["num_test_examples"] == 300
    assert set(after) == {"training_loss", "training_accuracy", "test_loss", "test_accuracy",
                          "num_train_examples", "num_test_examples"}
    json.dumps(after, allow_nan=False)

    assert isinstance(updated, ScaleoutModel)
    assert [p.shape for p in updated.get_training_model(NUMPY_HELPER)] == list(model.expected_shapes().values())
    assert set(meta) == {"training_metadata"}  # one shape: what the dispatcher entry point writes too
    trained = meta["training_metadata"]
    assert {k: trained[k] for k in ("num_examples", "epochs", "batch_size", "learning_rate", "optimizer",
                                    "precision", "seed", "rows_skipped", "duplicate_image_ids")} == {
        "num_examples": 1000, "epochs": 1, "batch_size": 64, "learning_rate": 1.0, "optimizer": "adadelta",
        "precision": auto_precision_here(), "seed": 1, "rows_skipped": 0, "duplicate_image_ids": 0}
    assert trained["data_fingerprint"] == shards_fingerprint([node_dir / "train" / "shard-000.csv"])
    assert 0 < trained["training_accuracy"] <= 1 and 0 < trained["training_loss"]
    json.dumps(meta, allow_nan=False)

    # 1000 images / 64 = 16 batches: an abort check before every batch, metrics at batch 50 (none) and epoch end.
    assert runtime.checks >= 16
    logged = [m["metrics"] for m in runtime.metrics]
    assert logged and set(logged[-1]) == {"training_loss", "training_accuracy"}
    assert all(m["round_id"] == "r1" for m in runtime.metrics)


def test_metrics_are_logged_every_50_batches_and_every_epoch(started, seed_path, node_dir, mnist5k):
    client, runtime = started
    images, labels = mnist5k
    shutil.rmtree(node_dir / "train")
    data.write_shard(node_dir / "train" / "small.csv", images[:100], labels[:100])
    call(client, client.train_callback, seed_model(seed_path), {"epochs": 2, "batch_size": 2})
    # 50 batches per epoch -> logs at batch 50 and epoch end, at batch 100 and epoch end
    assert len(runtime.metrics) == 4
    assert all(type(v) is float for m in runtime.metrics for v in m["metrics"].values())
    assert [m["step"] for m in runtime.metrics] == list(range(4))


def test_abort_stops_training_at_the_next_batch(started, seed_path):
    """1000 images in batches of 10: an abort at the 30th check stops before batch 30, long before
    the first metric log (batch 50), so no metric and no model leave the callback: an abort is seen
    before every batch, not once per epoch.
    """
    client, runtime = started
    runtime.abort_at_check = 30
    with pytest.raises(StoppedException):
        call(client, client.train_callback, seed_model(seed_path), {"batch_size": 10})
    assert runtime.checks == 30  # no batch ran after the abort check that raised
    assert runtime.metrics == []


def test_the_train_result_names_the_exact_shard_bytes_it_trained_on(started, seed_path, node_dir, mnist5k):
    """``data_fingerprint`` is checked against the sha256 of the files on disk, computed here, not
    against ``data.load_split`` (the same cached Dataset the callback used): it names exactly the bytes
    trained on, every shard of them, and changes when they do.
    """
    client, _ = started
    images, labels = mnist5k
    train = node_dir / "train"
    shutil.rmtree(train)
    data.write_shard(train / "a.csv", images[:60], labels[:60])
    data.write_shard(train / "b.csv", images[60:100], labels[60:100], fmt="png")
    settings = {"batch_size": 50, "precision": "fp32"}
    _, first = call(client, client.train_callback, seed_model(seed_path), settings)
    first = first["training_metadata"]
    assert first["data_fingerprint"] == shards_fingerprint([train / "a.csv", train / "b.csv"])
    data.write_shard(train / "b.csv", images[60:101], labels[60:101], fmt="png")  # one more image
    _, second = call(client, client.train_callback, seed_model(seed_path), settings)
    second = second["training_metadata"]
    assert second["num_examples"] == 101
    assert second["data_fingerprint"] == shards_fingerprint([train / "a.csv", train / "b.csv"])
    assert second["data_fingerprint"] != first["data_fingerprint"]


@pytest.mark.parametrize("asked", ["fp32", "bf16", "auto"])
def test_the_train_result_says_which_precision_computed(started, seed_path, node_dir, mnist5k, asked):
    """The result names the precision the loop computed in (``auto`` resolved to bf16 or fp32), never the
    setting asked for. The expectation comes from /proc/cpuinfo (conftest), not ``hardware.bf16_supported``."""
    client, _ = started
    images, labels = mnist5k
    shutil.rmtree(node_dir / "train")
    data.write_shard(node_dir / "train" / "a.csv", images[:64], labels[:64])
    _, meta = call(client, client.train_callback, seed_model(seed_path), {"precision": asked})
    expected = auto_precision_here() if asked == "auto" else asked
    assert meta["training_metadata"]["precision"] == expected


def test_bad_settings_fail_the_task_naming_the_key(started, seed_path):
    client, _ = started
    for settings, key in [({"epochs": 0}, "'epochs'"), ({"optimizer": "rmsprop"}, "'optimizer'"),
                          ({"lr": 0.1}, "unknown setting 'lr'")]:
        with pytest.raises(SettingsError, match=key):
            call(client, client.train_callback, seed_model(seed_path), settings)


def test_model_of_the_wrong_shape_fails_with_expected_vs_got(started):
    client, _ = started
    params = model.get_parameters(model.Net())
    params[6] = np.zeros((5, 128), dtype=np.float32)
    wrong = ScaleoutModel.from_training_model(params, NUMPY_HELPER)
    with pytest.raises(ModelFileError, match=r"fc2.weight\) expected shape \(10, 128\), got \(5, 128\)"):
        call(client, client.train_callback, wrong, {})
    with pytest.raises(ModelFileError, match="expected 8 parameter arrays"):
        call(client, client.validate_callback, ScaleoutModel.from_training_model(params[:3], NUMPY_HELPER))


def test_validate_sends_its_error_as_an_attribute(started):
    """scaleout reports a raising validate as COMPLETED without metrics: the reason must reach the server."""
    client, runtime = started
    params = model.get_parameters(model.Net())[:3]
    with pytest.raises(ModelFileError):
        call(client, client.validate_callback, ScaleoutModel.from_training_model(params, NUMPY_HELPER))
    assert "expected 8 parameter arrays" in runtime.attributes[-1]["validation_error"]


def test_validate_with_a_broken_test_split_still_reports(started, seed_path, node_dir):
    client, runtime = started
    (node_dir / "test" / "shard-000.csv").write_text("image_id,label\n1,2\n")
    metrics = call(client, client.validate_callback, seed_model(seed_path))
    assert metrics["num_test_examples"] == 0 and metrics["num_train_examples"] == 1000
    assert metrics["test_accuracy"] == metrics["training_accuracy"]
    assert "shard-000.csv:1: not a CSV shard" in runtime.attributes[-1]["validation_error"]


def test_bad_rows_are_counted_in_the_train_result(started, seed_path, node_dir):
    client, _ = started
    shard = node_dir / "train" / "shard-000.csv"
    with open(shard, "a", newline="") as handle:
        handle.write("9999,12,AAAA,,,\n9998,3,not-an-image,,,\n")
    _, meta = call(client, client.train_callback, seed_model(seed_path), {})
    assert meta["training_metadata"]["rows_skipped"] == 2 and meta["training_metadata"]["num_examples"] == 1000


def test_missing_data_dir_fails_naming_the_path(seed_path, monkeypatch, tmp_path):
    client, _ = start(tmp_path, monkeypatch, tmp_path / "nowhere")
    with pytest.raises(data.DataError, match=f"{tmp_path / 'nowhere' / 'train'}: no such file or directory"):
        call(client, client.train_callback, seed_model(seed_path), {})


def test_data_dir_defaults_to_data_in_the_working_directory(seed_path, node_dir, monkeypatch, tmp_path):
    (tmp_path / "work").mkdir()
    shutil.copytree(node_dir, tmp_path / "work" / "data")
    client, _ = start(tmp_path, monkeypatch, None)
    metrics = call(client, client.validate_callback, seed_model(seed_path))
    assert metrics["num_train_examples"] == 1000


def test_the_node_is_read_once_at_start_and_a_task_cannot_move_it(started, seed_path, node_dir, monkeypatch,
                                                                   tmp_path):
    """The data directory is the one the environment named when the client started: changing the
    process's environment or working directory afterwards does not redirect a task."""
    client, _ = started
    monkeypatch.setenv("SCALEOUT_DATA_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    metrics = call(client, client.validate_callback, seed_model(seed_path))
    assert metrics["num_train_examples"] == 1000


def test_validate_without_test_split_reports_training_metrics(started, seed_path, node_dir, caplog):
    client, _ = started
    shutil.rmtree(node_dir / "test")
    with caplog.at_level(logging.INFO, logger="mnist_edge"):
        metrics = call(client, client.validate_callback, seed_model(seed_path))
    assert metrics["test_accuracy"] == metrics["training_accuracy"] and metrics["num_test_examples"] == 0
    assert any("has no test split" in r.getMessage() for r in caplog.records)


def read_predictions(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_writes_one_row_per_image_and_reports_attributes(started, seed_path, node_dir, mnist5k):
    client, runtime = started
    images, labels = mnist5k
    data.write_shard(node_dir / "predict" / "p.csv", images[:37], np.full(37, data.NO_LABEL), np.arange(500, 537))
    seed = seed_model(seed_path)
    summary = call(client, client.inference_callback, seed, {})
    out = node_dir / "predictions" / f"{seed.model_id}.csv"
    rows = read_predictions(out)
    assert [r["image_id"] for r in rows] == [str(i) for i in range(500, 537)]
    assert all(0 <= int(r["label"]) <= 9 and 0 < float(r["confidence"]) <= 1 for r in rows)
    assert summary == {"model_id": seed.model_id, "count": 37, "output": str(out), "rows_skipped": 0}
    # What a server reads: plain values, never a JSON string inside the 1.1 record's JSON payload.
    expected = {"prediction_model_id": seed.model_id, "prediction_count": 37,
                "prediction_output": str(out), "prediction_rows_skipped": 0}
    if CLIENT_LINE == "1.0.7":  # its AttributeMessage carries strings only: numbers as their JSON text
        expected.update(prediction_count="37", prediction_rows_skipped="0")
    assert runtime.attributes[-1] == expected


def test_predict_on_labelled_test_split_with_output_override(started, seed_path, node_dir):
    client, runtime = started
    out = node_dir / "elsewhere" / "p.csv"  # a relative output is inside the data directory
    task = {"data": "test", "output": "elsewhere/p.csv"}
    summary = call(client, client.inference_callback, seed_model(seed_path), task)
    assert summary["output"] == str(out.resolve())
    assert summary["count"] == 300 == len(read_predictions(out)) and summary["labelled"] == 300
    assert 0 <= summary["accuracy"] <= 1
    sent = runtime.attributes[-1]
    if CLIENT_LINE == "1.0.7":
        assert all(isinstance(v, str) for v in sent.values())
        assert json.loads(sent["prediction_accuracy"]) == summary["accuracy"]
    else:
        assert sent["prediction_accuracy"] == summary["accuracy"] and sent["prediction_labelled"] == 300


def test_predict_rejects_unknown_parameters(started, seed_path):
    client, _ = started
    with pytest.raises(edge.PredictParameterError, match="unknown inference parameter 'split'"):
        call(client, client.inference_callback, seed_model(seed_path), {"split": "test"})


def test_the_update_is_compressed_once_and_reads_back_everywhere():
    """Our container stores the level-1 npz as it is (no second deflate); stock readers get the same weights."""
    import io
    import zipfile

    params = model.get_parameters(model.new_model(0))
    update = container.to_scaleout_model(params)
    stock = ScaleoutModel.from_training_model(params, NUMPY_HELPER)  # what the client's own API builds
    assert set(update.metadata) == set(stock.metadata) == {"model_id", "helper_type"}
    assert update.metadata["helper_type"] == "numpyhelper" and update.model_id != stock.model_id
    with zipfile.ZipFile(update.get_file_stream()) as archive:
        entry = archive.getinfo(container.CONTAINER_TRAINING_MODEL)
        assert entry.compress_type == zipfile.ZIP_STORED
        inner = archive.read(entry)
    with zipfile.ZipFile(io.BytesIO(inner)) as npz:
        assert [i.filename for i in npz.infolist()] == [f"{i}.npy" for i in range(8)]
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in npz.infolist())
    assert entry.file_size < 0.95 * 4 * model.PARAMETER_COUNT  # deflated inside: about the stock size
    for built in (update, update.to_builder().set_model_id("u-1").build()):  # as the client re-ids it
        assert all(np.array_equal(a, b) for a, b in zip(built.get_training_model(NUMPY_HELPER), params))
    assert all(np.array_equal(a, b) for a, b in zip(container.params_from(update), params))

"""The seam with Scaleout Edge: the train / validate / predict callbacks of the compute package.

This is the only module that knows the client exists. It turns a ``ScaleoutModel`` into the
CNN and back, reads the node's shards, forwards progress to ``client.log_metric``, lets the
client abort a task between batches, and returns plain JSON values (the client drops or
chokes on anything else).
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import scaleoututil.grpc.scaleout_pb2 as scaleout_msg
from scaleout import ScaleoutModel
from scaleoututil.helpers.helpers import get_helper

from . import data, hardware, model, paths, privacy, training
from .settings import capped_batch_size, parse_settings

log = logging.getLogger("mnist_edge")
HELPER = get_helper("numpyhelper")
PREDICT_PARAMETERS = ("data", "output")

# The one difference between the client lines this package acts on: how attributes travel.
# scaleout 1.1 sends each key as an AttributeRecord with the JSON payload {"value": v}, so a value
# goes as it is; 1.0.7's AttributeMessage carries strings only, so a number goes as its JSON text.
ATTRIBUTE_RECORDS = hasattr(scaleout_msg, "AttributeRecord")


class PredictParameterError(ValueError):
    """An inference task's parameters are not understood."""


def configure_logging() -> None:
    """Show this package's warnings (bad rows, missing test split) in the client's output."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [mnist_edge] %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars, paths and non-finite floats made plain JSON."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def attribute_values(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """``attributes`` as ``client.log_attributes`` must get them for a server to read plain values."""
    plain = json_safe(attributes)
    if ATTRIBUTE_RECORDS:
        return plain
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in plain.items()}


def params_from(scaleout_model: ScaleoutModel) -> list[np.ndarray]:
    """The CNN's parameter list from a ScaleoutModel, checked (headers before data, then finiteness).

    Read with :func:`model.read_npz` rather than the stock numpyhelper, which allocates whatever
    array sizes the file declares before anything can check them.
    """
    source = f"model {scaleout_model.model_id}"
    try:
        with scaleout_model.get_training_model_stream() as stream:
            return model.read_npz(stream, source)
    except (KeyError, zipfile.BadZipFile, OSError) as error:
        raise model.ModelFileError(f"{source}: holds no readable parameter file ({error})") from None


# The client's model container (``scaleoututil.utils.model``, the same on 1.0.7 and 1.1): a zip
# holding metadata.json and the helper's bytes as training_model.bin. from_training_model has the
# helper write an npz and then deflates that member again at zlib's default level, a second pass
# over bytes that are compressed already; ScaleoutModel.from_stream takes a finished container as
# it is, so the update is compressed once. Both lines read an unstamped metadata.json as their
# current format, and the client re-stamps the update when it sets the update's id.
CONTAINER_METADATA = "metadata.json"
CONTAINER_TRAINING_MODEL = "training_model.bin"
UPDATE_NPZ_LEVEL = 1


def update_npz(params: list[np.ndarray], level: int | None = UPDATE_NPZ_LEVEL) -> bytes:
    """The numpyhelper's npz (members ``0.npy``, ``1.npy``, ...) deflated at level 1, not 6.

    Float32 weights barely compress beyond what level 1 finds: the same size in less time, and
    the server's and combiner's stock numpyhelper load it unchanged. ``level=None`` stores the
    members uncompressed (measured against this in ``bench/round_overhead.py``).
    """
    buffer = io.BytesIO()
    compression = zipfile.ZIP_STORED if level is None else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buffer, "w", compression, compresslevel=level) as npz:
        for index, array in enumerate(params):
            with npz.open(f"{index}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()


def to_scaleout_model(params: list[np.ndarray], level: int | None = UPDATE_NPZ_LEVEL) -> ScaleoutModel:
    """The update as a ScaleoutModel (helper ``numpyhelper``, a fresh model id), compressed once.

    The npz (``update_npz`` at ``level``) goes into the client's container as it is.
    """
    container = io.BytesIO()
    with zipfile.ZipFile(container, "w") as archive:
        metadata = {"model_id": str(uuid.uuid4()), "helper_type": HELPER.name}
        archive.writestr(CONTAINER_METADATA, json.dumps(metadata), zipfile.ZIP_DEFLATED)
        archive.writestr(CONTAINER_TRAINING_MODEL, update_npz(params, level), zipfile.ZIP_STORED)
    container.seek(0)
    return ScaleoutModel.from_stream(container)


class EdgeTasks:
    """The callbacks of one edge client; holds the CNN so rounds reuse its memory."""

    def __init__(self, client: Any, data_dir: str | Path | None = None) -> None:
        self.client = client
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self.net = model.Net()
        self.device = hardware.select_device()

    @property
    def data_dir(self) -> Path:
        """Resolved per task: the client sets the working directory before calling back."""
        return self._data_dir if self._data_dir is not None else data.data_dir_from_env()

    def _load_model(self, scaleout_model: ScaleoutModel) -> None:
        model.set_parameters(self.net, params_from(scaleout_model), f"model {scaleout_model.model_id}")

    def _log_metrics(self, metrics: training.Metrics) -> None:
        self.client.log_metric({k: float(v) for k, v in metrics.items()})

    def train(self, scaleout_model: ScaleoutModel, client_settings: Mapping[str, Any] | None) -> tuple[ScaleoutModel, dict]:
        """One round of local training; raises (task FAILED) on bad settings, model or data."""
        requested = parse_settings(client_settings)
        self._load_model(scaleout_model)
        dataset = data.load_split(self.data_dir, "train")
        settings = capped_batch_size(requested, len(dataset))
        # DP-SGD when the node has a budget or the round asks; charged before the first batch.
        result, dp_metadata = privacy.train_round(
            self.net,
            dataset.images,
            dataset.labels,
            settings,
            model_id=scaleout_model.model_id,
            data_fingerprint=dataset.fingerprint,
            on_batch=self.client.check_task_abort,
            on_metrics=self._log_metrics,
            device=self.device,
        )
        metadata = {
            "training_metadata": {
                "num_examples": result.num_examples,
                "epochs": settings.epochs,
                "batch_size": settings.batch_size,
                "learning_rate": settings.learning_rate,
                "optimizer": settings.optimizer,
                "precision": result.precision,
                "seed": settings.seed,
            },
            "training_loss": result.training_loss,
            "training_accuracy": result.training_accuracy,
            "rows_skipped": dataset.rows_skipped,
            "duplicate_image_ids": dataset.duplicate_image_ids,
            "data_fingerprint": dataset.fingerprint,
            **dp_metadata,
        }
        if settings.batch_size != requested.batch_size:
            metadata["training_metadata"]["batch_size_requested"] = requested.batch_size
        log.info("trained %d images for %d epoch(s): loss %.4f, accuracy %.4f",
                 result.num_examples, settings.epochs, result.training_loss, result.training_accuracy)
        return to_scaleout_model(model.get_parameters(self.net)), json_safe(metadata)

    def validate(self, scaleout_model: ScaleoutModel) -> dict:
        """Loss and accuracy on the local train and test shards.

        scaleout reports a validate callback that raises as COMPLETED with no metrics, so the
        reason is also sent as the ``validation_error`` attribute; a broken or missing test
        split is recoverable: the training metrics are reported with ``num_test_examples`` 0.
        """
        try:
            self._load_model(scaleout_model)
            train_set = data.load_split(self.data_dir, "train")
        except (model.ModelFileError, data.DataError) as error:
            self.client.log_attributes(attribute_values({"validation_error": str(error)}))
            raise
        check = self.client.check_task_abort
        train_loss, train_acc = training.evaluate(self.net, train_set.images, train_set.labels, self.device, check)
        metrics: dict[str, Any] = {
            "training_loss": train_loss,
            "training_accuracy": train_acc,
            "num_train_examples": len(train_set),
            "test_loss": train_loss,
            "test_accuracy": train_acc,
            "num_test_examples": 0,
        }
        if not data.has_split(self.data_dir, "test"):
            log.info("%s has no test split: reporting training metrics as test metrics", self.data_dir)
            return json_safe(metrics)
        try:
            test_set = data.load_split(self.data_dir, "test")
        except data.DataError as error:
            log.error("test split unusable, reporting training metrics as test metrics: %s", error)
            self.client.log_attributes(attribute_values({"validation_error": str(error)}))
            return json_safe(metrics)
        test_loss, test_acc = training.evaluate(self.net, test_set.images, test_set.labels, self.device, check)
        metrics.update(test_loss=test_loss, test_accuracy=test_acc, num_test_examples=len(test_set))
        return json_safe(metrics)

    def _predict_location(self, params: Mapping[str, Any]) -> Path:
        """``data``: a split name, or a shard or directory inside the data directory."""
        choice = params.get("data", "predict")
        if choice in data.SPLITS:
            return data.split_location(self.data_dir, choice)
        return paths.inside_data_dir(self.data_dir, choice, "data")

    def _predict_output(self, params: Mapping[str, Any], model_id: str) -> Path:
        """``output`` inside the data directory, or ``predictions/<model id>.csv``; never an input shard."""
        if params.get("output") is not None:
            output = paths.inside_data_dir(self.data_dir, params["output"], "output")
        else:
            name = paths.file_name(model_id, "model id")
            output = paths.inside_data_dir(self.data_dir, f"predictions/{name}.csv", "model id")
        inputs = [data.split_location(self.data_dir, split) for split in data.SPLITS]
        paths.refuse_inputs(output, inputs, "parameter 'output'")
        return output

    def predict(self, scaleout_model: ScaleoutModel, params: Mapping[str, Any] | None) -> dict:
        """Predict every row of the predict shards into ``image_id,label,confidence`` CSV."""
        if params is not None and not isinstance(params, Mapping):
            raise PredictParameterError(f"inference parameters must be a mapping, got {type(params).__name__}")
        params = dict(params or {})
        unknown = sorted(map(str, set(params) - set(PREDICT_PARAMETERS)))
        if unknown:
            raise PredictParameterError(
                f"unknown inference parameter {unknown[0][:40]!r}; accepted: {', '.join(PREDICT_PARAMETERS)}"
            )
        location = self._predict_location(params)
        output = self._predict_output(params, scaleout_model.model_id)
        self._load_model(scaleout_model)
        dataset = data.load_dataset(location, labels_required=False)
        predicted, confidence = training.predict(self.net, dataset.images, self.device, self.client.check_task_abort)
        data.write_predictions(output, dataset.image_ids, predicted, confidence)
        summary: dict[str, Any] = {
            "model_id": scaleout_model.model_id,
            "count": len(predicted),
            "output": str(output),
            "rows_skipped": dataset.rows_skipped,
        }
        labelled = dataset.labels != data.NO_LABEL
        if labelled.any():
            summary["accuracy"] = float((predicted[labelled] == dataset.labels[labelled]).mean())
            summary["labelled"] = int(labelled.sum())
        summary = json_safe(summary)
        # The client drops the callback's return value: attributes are what reaches the server.
        self.client.log_attributes(attribute_values({f"prediction_{k}": v for k, v in summary.items()}))
        log.info("predicted %d images into %s", len(predicted), output)
        return summary


def register(client: Any, data_dir: str | Path | None = None) -> EdgeTasks:
    """Register train, validate and predict on an ``EdgeClient``; returns the task object."""
    configure_logging()
    tasks = EdgeTasks(client, data_dir)
    if paths.remove_partial_files(tasks.data_dir / "predictions"):
        log.warning("removed unfinished prediction files an earlier crash left in %s", tasks.data_dir / "predictions")
    try:
        has_train = data.has_split(tasks.data_dir, "train")
    except data.DataError as error:  # a data directory that is a file: every task will say so too
        log.warning("%s", error)
        has_train = True
    if not has_train:
        log.warning("%s has no train/ split yet: training tasks will fail until shards are there "
                    "(set SCALEOUT_DATA_DIR)", tasks.data_dir.resolve())
    client.set_train_callback(tasks.train)
    client.set_validate_callback(tasks.validate)
    client.set_inference_callback(tasks.predict)
    return tasks

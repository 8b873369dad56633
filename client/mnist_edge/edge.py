"""The seam with Scaleout Edge: the train / validate / predict callbacks of the compute package.

This is the only module the learning code is adapted to the client in. It turns a
``ScaleoutModel`` into the CNN and back, reads the node's shards, forwards progress to
``client.log_metric``, lets the client abort a task between batches, and returns plain JSON values
(the client drops or chokes on anything else). Where the two client lines differ, it says so here.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import scaleoututil.grpc.scaleout_pb2 as scaleout_msg
from scaleout import ScaleoutModel

from . import data, files, hardware, ledger_store, model, outputs, paths, privacy, report, status, training
from .container import params_from, to_scaleout_model
from .errors import UserError
from .node import STATE_DIR, NodeConfig, NodeConfigError
from .settings import capped_batch_size, parse_settings

log = logging.getLogger("mnist_edge")
PREDICT_PARAMETERS = ("data", "output")

# The one difference between the client lines this package acts on: how attributes travel.
# scaleout 1.1 sends each key as an AttributeRecord with the JSON payload {"value": v}, so a value
# goes as it is; 1.0.7's AttributeMessage carries strings only, so a number goes as its JSON text.
ATTRIBUTE_RECORDS = hasattr(scaleout_msg, "AttributeRecord")


class PredictParameterError(paths.PathError):
    """An inference task's parameters are not understood."""


class ModelIdError(UserError, ValueError):
    """The server's model id is not a plain name: it would reach the ledger, metadata and file names."""


def model_id_of(scaleout_model: ScaleoutModel) -> str:
    """The model's id, if it is a plain name of :data:`paths.MAX_NAME_CHARS` at most (a Scaleout id is
    a UUID); checked before a task uses it, so no id reaches the ledger, a message or a path unbounded."""
    model_id = scaleout_model.model_id
    try:
        return paths.file_name(model_id, "model id")
    except paths.PathError:
        shown = paths.describe(model_id) if isinstance(model_id, str) else type(model_id).__name__
        raise ModelIdError(f"model id {shown} is not one this node accepts: expected {paths.FILE_NAME_RULE} "
                           "(a Scaleout model id is a UUID)") from None


def configure_logging() -> None:
    """Show this package's warnings (bad rows, missing test split) in the client's output."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [mnist_edge] %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def attribute_values(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """``attributes`` as ``client.log_attributes`` must get them for a server to read plain values."""
    plain = report.json_safe(attributes)
    if ATTRIBUTE_RECORDS:
        return plain
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in plain.items()}


class EdgeTasks:
    """The callbacks of one edge client; holds the CNN so rounds reuse its memory.

    ``client`` needs ``log_metric``, ``log_attributes`` and ``check_task_abort`` (an ``EdgeClient``).
    ``node`` is the node's configuration, or the error reading it gave: then every task fails with it.
    """

    def __init__(self, client: Any, node: NodeConfig | NodeConfigError) -> None:
        self.client = client
        self._node = node
        self.net = model.Net()
        self.device = hardware.select_device()

    @property
    def node(self) -> NodeConfig:
        if isinstance(self._node, NodeConfigError):
            raise self._node
        return self._node

    def _load_model(self, scaleout_model: ScaleoutModel) -> str:
        """Load the server's model into the CNN; returns its (checked) id."""
        model_id = model_id_of(scaleout_model)
        model.set_parameters(self.net, params_from(scaleout_model), f"model {model_id}")
        return model_id

    def _log_metrics(self, metrics: training.Metrics) -> None:
        self.client.log_metric({k: float(v) for k, v in metrics.items()})

    def train(self, scaleout_model: ScaleoutModel,
              client_settings: Mapping[str, Any] | None) -> tuple[ScaleoutModel, dict]:
        """One round of local training; raises (task FAILED) on bad settings, model or data."""
        node = self.node
        model_id_of(scaleout_model)
        requested = parse_settings(client_settings)
        model_id = self._load_model(scaleout_model)
        dataset = data.load_split(node.data_dir, "train")
        settings = capped_batch_size(requested, len(dataset))
        hooks = {"on_batch": self.client.check_task_abort, "on_metrics": self._log_metrics, "device": self.device}
        # DP-SGD when the node has a budget or the round asks; charged before the first batch.
        plan = privacy.plan_round(settings, len(dataset), node.privacy)
        if plan is None:
            result, dp_metadata = training.train(self.net, dataset.images, dataset.labels, settings, **hooks), {}
        else:
            settings = plan.settings  # the node's DP defaults where the round did not say
            result, dp_metadata = privacy.train_round(
                self.net, dataset.images, dataset.labels, plan, node.privacy,
                model_id=model_id, data_fingerprint=dataset.fingerprint, **hooks)
        metadata = report.training_metadata(result, settings, requested, dataset, dp_metadata)
        log.info("trained %d images for %d epoch(s): loss %.4f, accuracy %.4f",
                 result.num_examples, settings.epochs, result.training_loss, result.training_accuracy)
        return to_scaleout_model(model.get_parameters(self.net)), {"training_metadata": metadata}

    def validate(self, scaleout_model: ScaleoutModel) -> dict:
        """Loss and accuracy on the local train and test shards.

        scaleout reports a validate callback that raises as COMPLETED with no metrics, so the
        reason is also sent as the ``validation_error`` attribute; a broken or missing test
        split is recoverable: the training metrics are reported with ``num_test_examples`` 0.
        """
        try:
            node = self.node
            self._load_model(scaleout_model)
            train_set = data.load_split(node.data_dir, "train")
        except (NodeConfigError, ModelIdError, model.ModelFileError, data.DataError) as error:
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
        if not data.has_split(node.data_dir, "test"):
            log.info("%s has no test split: reporting training metrics as test metrics", node.data_dir)
            return report.json_safe(metrics)
        try:
            test_set = data.load_split(node.data_dir, "test")
        except data.DataError as error:
            log.error("test split unusable, reporting training metrics as test metrics: %s", error)
            self.client.log_attributes(attribute_values({"validation_error": str(error)}))
            return report.json_safe(metrics)
        test_loss, test_acc = training.evaluate(self.net, test_set.images, test_set.labels, self.device, check)
        metrics.update(test_loss=test_loss, test_accuracy=test_acc, num_test_examples=len(test_set))
        return report.json_safe(metrics)

    def _predict_location(self, params: Mapping[str, Any]) -> Path:
        """``data``: a split name, or a shard or directory inside the data directory (no hidden name)."""
        choice = params.get("data", "predict")
        if choice in data.SPLITS:
            return data.split_location(self.node.data_dir, choice)
        return paths.inside_data_dir(self.node.data_dir, choice, "data")

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
        model_id = model_id_of(scaleout_model)
        location = self._predict_location(params)
        output = outputs.choose(self.node.data_dir, params.get("output"), model_id, location)
        ledger = self.node.privacy.ledger  # the node's own files, wherever the operator keeps them
        owned = [self.node.data_dir / STATE_DIR, *([ledger, ledger_store.head_path(ledger)] if ledger else [])]
        paths.refuse_node_files(output.path, owned, "parameter 'output'")
        self._load_model(scaleout_model)
        dataset = data.load_dataset(location, labels_required=False)
        predicted, confidence = training.predict(self.net, dataset.images, self.device, self.client.check_task_abort)
        outputs.write(output, lambda handle: data.prediction_rows(handle, dataset.image_ids, predicted, confidence))
        summary: dict[str, Any] = {
            "model_id": model_id,
            "count": len(predicted),
            "output": str(output.path),
            "rows_skipped": dataset.rows_skipped,
        }
        labelled = dataset.labels != data.NO_LABEL
        if labelled.any():
            summary["accuracy"] = float((predicted[labelled] == dataset.labels[labelled]).mean())
            summary["labelled"] = int(labelled.sum())
        summary = report.json_safe(summary)
        # The client drops the callback's return value: attributes are what reaches the server.
        self.client.log_attributes(attribute_values({f"prediction_{k}": v for k, v in summary.items()}))
        log.info("predicted %d images into %s", len(predicted), output.path)
        return summary

    def node_status(self, parameters: Any = None) -> dict:
        """The ``node_status`` command: counts, fingerprints, versions, precision, privacy budget.

        A custom callback that raises is reported COMPLETED with no response (both client lines),
        so a refusal is an answer too. The answer is returned (the task's response) and also sent
        as the ``node_status`` attribute.
        """
        if parameters:
            answer: dict[str, Any] = {"error": "node_status takes no parameters"}
        elif isinstance(self._node, NodeConfigError):
            answer = {"error": str(self._node)}  # names a node variable, never a file's content
        else:
            answer = status.node_status(self.node)
        self.client.log_attributes(attribute_values({"node_status": answer}))
        return answer


def node_from_environment() -> NodeConfig | NodeConfigError:
    """The node as this process's environment describes it (the client's working directory is the base)."""
    try:
        return NodeConfig.from_environment(os.environ, Path.cwd(), hardware.cpu_count())
    except NodeConfigError as error:
        return error


def register(client: Any, node: NodeConfig | None = None) -> EdgeTasks:
    """Register train, validate and predict on an ``EdgeClient``; returns the task object.

    ``startup.py`` calls it with no ``node``: the node's configuration is then read from the
    environment here, once, and the process is set up for it (threads, allocator). A node variable
    this package cannot use is logged now, and fails every task with the same message.
    """
    if node is None:
        configure_logging()
        found = node_from_environment()
        if isinstance(found, NodeConfigError):
            log.error("%s; every task will fail until it is fixed", found)
        else:
            hardware.configure_process(found.threads, os.environ)
        tasks = EdgeTasks(client, found)
    else:
        tasks = EdgeTasks(client, node)
    train, validate = tasks.train, tasks.validate
    if not isinstance(tasks._node, NodeConfigError):
        _check_data_dir(tasks.node)
        lock = tasks.node.compute_lock
        # scaleout 1.1 holds SCALEOUT_CLIENT_COMPUTE_LOCK around train and validate itself; 1.0.7 never
        # reads it, so there the package takes the same flock (a second one in this process would deadlock).
        if lock is not None and getattr(client, "_compute_lock", None) is None:
            train, validate = holding(lock, train), holding(lock, validate)
    client.set_train_callback(train)
    client.set_validate_callback(validate)
    client.set_inference_callback(tasks.predict)
    client.set_custom_callback("node_status", tasks.node_status)
    return tasks


def holding(lock: Path, callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` run while this process holds ``lock`` (the compute lock of N clients on one box)."""
    @functools.wraps(callback)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with files.exclusive(lock):
            return callback(*args, **kwargs)
    return locked


def _check_data_dir(node: NodeConfig) -> None:
    """Say at start what will make every task fail, and clear what a crashed writer left."""
    predictions = node.data_dir / "predictions"
    if predictions.is_dir() and not predictions.is_symlink() and files.remove_stale_partials(predictions):
        log.warning("removed unfinished prediction files an earlier crash left in %s", predictions)
    try:
        has_train = data.has_split(node.data_dir, "train")
    except data.DataError as error:  # a data directory that is a file: every task will say so too
        log.warning("%s", error)
        return
    if not has_train:
        log.warning("%s has no train/ split yet: training tasks will fail until shards are there "
                    "(set SCALEOUT_DATA_DIR)", node.data_dir)

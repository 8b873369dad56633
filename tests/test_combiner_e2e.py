"""The compute package inside three real ``scaleout client start`` processes.

A user's path, end to end: ship ``client/`` with ``scaleout package create``, build the seed
with ``scaleout run build``, split MNIST with ``mnist_edge prepare``, start three clients
against a combiner (here the loopback :class:`combiner.TestCombiner`), run FedAvg rounds with
validation, predict, and stop. Then the edges: an aborted round, a round with bad settings,
a model that does not fit. Every wait is bounded; a client that dies fails the wait at once.
"""

from __future__ import annotations

import csv
import json
import math
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from scaleoututil.grpc import scaleout_pb2 as msg

from combiner import INFER, TRAIN, VALIDATE, Task, TestCombiner
from conftest import CLIENT_LINE, SUMMARY
from e2e_helpers import (
    EdgeNode,
    Fleet,
    fedavg,
    package_tarball,
    prepare_shards,
    unpack,
)
from mnist_edge import data, model, training

pytestmark = pytest.mark.e2e

CLIENTS = 3
TEST_FRACTION = 0.6  # of mnist5k's 5,000 images: 667 train and 1,000 held-out per client
POLL = 1  # seconds; SCALEOUT_CLIENT_TASK_POLLING_INTERVAL takes whole seconds
READY_TIMEOUT = 120  # three clients importing torch on two busy cores
TASK_TIMEOUT = 90
BATCH_ALLOWANCE = 2.0  # seconds one batch of one image may take on a loaded machine


def round_settings(number: int) -> dict:
    return {"epochs": 1, "batch_size": 32, "learning_rate": 1.0, "optimizer": "adadelta", "seed": number}


@dataclass
class HeldOut:
    """The union of the clients' test splits: images no client trains on."""

    images: np.ndarray
    labels: np.ndarray

    def accuracy(self, params: list[np.ndarray]) -> float:
        net = model.Net()
        model.set_parameters(net, params)
        return training.evaluate(net, self.images, self.labels, torch.device("cpu"))[1]


@dataclass
class Round:
    """One FedAvg round as the combiner saw it."""

    round_id: str
    settings: dict
    model_id: str  # the global model the clients trained from
    updates: dict[str, msg.ModelUpdate]  # by client id
    metas: dict[str, dict]
    training_metrics: dict[str, list[msg.ModelMetric]]
    aggregate_id: str
    validations: dict[str, dict]
    accuracy: float  # of the aggregate on the held-out images, measured here


# -- fixtures: the fleet is started once for the module -----------------------------------------


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory, seed_path: Path) -> Iterator[tuple[Fleet, str]]:
    """Three polling clients, and the seed (``conftest.seed_path``: the real ``scaleout run build``)."""
    root = tmp_path_factory.mktemp("e2e")
    tarball = package_tarball(root / "dist")
    data_dirs = prepare_shards(root / "data", CLIENTS, TEST_FRACTION)
    nodes = []
    for i, data_dir in enumerate(data_dirs):
        workdir = root / f"node-{i}"
        unpack(tarball, workdir)
        nodes.append(EdgeNode(f"client-{i}", workdir, data_dir))
    fleet = Fleet(TestCombiner(), nodes)
    with fleet.running(POLL, seed_path, READY_TIMEOUT) as seed_id:
        yield fleet, seed_id


@pytest.fixture(scope="module")
def fleet(started: tuple[Fleet, str]) -> Fleet:
    return started[0]


@pytest.fixture(scope="module")
def seed_id(started: tuple[Fleet, str]) -> str:
    return started[1]


@pytest.fixture(scope="module")
def held_out(fleet: Fleet) -> HeldOut:
    splits = [data.load_split(node.data_dir, "test") for node in fleet.nodes]
    return HeldOut(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]))


@pytest.fixture(scope="module")
def rounds(fleet: Fleet, seed_id: str, held_out: HeldOut) -> list[Round]:
    """Three FedAvg rounds from the seed, each validated on every client."""
    history, model_id = [], seed_id
    for number in (1, 2, 3):
        history.append(run_round(fleet, held_out, model_id, number))
        model_id = history[-1].aggregate_id
    return history


def run_all(fleet: Fleet, task_type: str, model_id: str, data: dict, round_id: str) -> dict[str, Task]:
    """Give every client the same task and wait until all have reported it done."""
    ids = {c: fleet.combiner.submit_task(c, task_type, model_id, data, round_id=round_id) for c in fleet.ids}
    fleet.combiner.wait_for_tasks(ids.values(), TASK_TIMEOUT)
    return {c: fleet.combiner.task(cid) for c, cid in ids.items()}


def assert_all(tasks: dict[str, Task], status: str) -> None:
    wrong = {c: (t.status, t.response) for c, t in tasks.items() if t.status != status}
    assert not wrong, f"expected every task {status}, got {wrong}"


def sent_for(fleet: Fleet, tasks: dict[str, Task], messages: list, what: str) -> dict:
    """The message (update, validation) each task sent, by client; the task's COMPLETED alone
    proves nothing: 1.1 sends its queued messages after the task may have been reported done."""
    by_task = fleet.combiner.wait_for_messages(messages, [t.correlation_id for t in tasks.values()],
                                               TASK_TIMEOUT, what)
    return {c: by_task[t.correlation_id] for c, t in tasks.items()}


def run_round(fleet: Fleet, held_out: HeldOut, model_id: str, number: int) -> Round:
    combiner, round_id, settings = fleet.combiner, f"round-{number}", round_settings(number)
    train = run_all(fleet, TRAIN, model_id, {"client_settings": settings}, round_id)
    assert_all(train, "COMPLETED")
    updates = sent_for(fleet, train, combiner.updates, "ModelUpdate")
    metas = {c: json.loads(u.meta) for c, u in updates.items()}
    aggregate = fedavg(
        combiner,
        [updates[c].model_update_id for c in fleet.ids],
        [metas[c]["training_metadata"]["num_examples"] for c in fleet.ids],
    )
    aggregate_id = combiner.put_model(aggregate)
    validate = run_all(fleet, VALIDATE, aggregate_id, {}, round_id)
    assert_all(validate, "COMPLETED")
    # The validation is queued after the training metrics in the same first-in-first-out class
    # (1.1), so once it has arrived every metric of the round has too.
    validations = sent_for(fleet, validate, combiner.validations, "ModelValidation")
    return Round(
        round_id=round_id,
        settings=settings,
        model_id=model_id,
        updates=updates,
        metas=metas,
        training_metrics={  # tagged by the client with the training task's model and round
            c: [m for m in combiner.metrics
                if (m.client_id, m.round_id, m.model_id) == (c, round_id, model_id)]
            for c in fleet.ids
        },
        aggregate_id=aggregate_id,
        validations={c: json.loads(v.data) for c, v in validations.items()},
        accuracy=held_out.accuracy(aggregate),
    )


def metric_values(messages: list[msg.ModelMetric], key: str) -> list[float]:
    return [e.value for m in messages for e in m.metrics if e.key == key]


def prediction_summary(combiner: TestCombiner, client_id: str, model_id: str) -> dict | None:
    """The client's prediction_* attributes once all of them, for ``model_id``, have arrived."""
    values = combiner.attributes_of(client_id)
    keys = {f"prediction_{k}" for k in ("model_id", "count", "output", "rows_skipped", "accuracy", "labelled")}
    return values if keys <= set(values) and values["prediction_model_id"] == model_id else None


# -- the user's path --------------------------------------------------------------------------


def test_every_update_carries_examples_fingerprint_settings_and_metrics(
    fleet: Fleet, rounds: list[Round]
) -> None:
    train_sets = {node.name: data.load_split(node.data_dir, "train") for node in fleet.nodes}
    for r in rounds:
        for client, meta in r.metas.items():
            update = r.updates[client]
            assert (update.model_id, update.round_id) == (r.model_id, r.round_id)
            training_metadata = meta["training_metadata"]
            assert training_metadata["num_examples"] == len(train_sets[client])
            assert training_metadata["data_fingerprint"] == train_sets[client].fingerprint
            for key in ("epochs", "batch_size", "learning_rate", "optimizer"):
                assert training_metadata[key] == r.settings[key], (client, key)
            assert math.isfinite(training_metadata["training_loss"])
            assert 0.0 <= training_metadata["training_accuracy"] <= 1.0

            # training_loss reached the combiner through SendModelMetric while the task ran:
            # tagged with the task's model and round, sent before the update was.
            metrics = r.training_metrics[client]
            assert metric_values(metrics, "training_loss"), f"{client} sent no training_loss in {r.round_id}"
            assert max(m.timestamp.ToNanoseconds() for m in metrics) <= update.timestamp.ToNanoseconds()
    fingerprints = {rounds[0].metas[c]["training_metadata"]["data_fingerprint"] for c in fleet.ids}
    assert len(fingerprints) == CLIENTS, "each client should train on its own shards"


def test_validation_after_each_round_reports_the_documented_metrics(
    fleet: Fleet, rounds: list[Round]
) -> None:
    keys = {"training_loss", "training_accuracy", "test_loss", "test_accuracy",
            "num_train_examples", "num_test_examples"}
    for r in rounds:
        for client, metrics in r.validations.items():
            assert keys <= set(metrics), f"{client} {r.round_id}: missing {keys - set(metrics)}"
        # The clients' test splits are the held-out set: their example-weighted accuracy is the
        # accuracy measured here, up to a few near-ties that float rounding decides differently.
        tested = sum(m["num_test_examples"] for m in r.validations.values())
        weighted = sum(m["test_accuracy"] * m["num_test_examples"] for m in r.validations.values()) / tested
        assert abs(weighted - r.accuracy) <= 5 / tested, (r.round_id, weighted, r.accuracy)


def test_fedavg_accuracy_rises_every_round_and_ends_above_90_percent(
    rounds: list[Round], seed_id: str, fleet: Fleet, held_out: HeldOut
) -> None:
    accuracies = [held_out.accuracy(fleet.combiner.get_params(seed_id))] + [r.accuracy for r in rounds]
    SUMMARY.append("e2e FedAvg held-out accuracy, seed then rounds 1-3: "
                   + ", ".join(f"{a:.4f}" for a in accuracies))
    assert all(later > earlier for earlier, later in zip(accuracies, accuracies[1:])), accuracies
    assert accuracies[-1] >= 0.90, accuracies


def test_inference_writes_a_predictions_csv_and_reports_its_summary_as_attributes(
    fleet: Fleet, rounds: list[Round]
) -> None:
    final = rounds[-1]
    tasks = run_all(fleet, INFER, final.aggregate_id, {"parameters": {}}, "predict")
    assert_all(tasks, "COMPLETED")
    for node in fleet.nodes:
        predict_set = data.load_split(node.data_dir, "predict", labels_required=False)
        output = node.data_dir / "predictions" / f"{final.aggregate_id}.csv"
        with open(output, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [int(r["image_id"]) for r in rows] == predict_set.image_ids.tolist()
        assert all(int(r["label"]) in range(10) and 0.0 <= float(r["confidence"]) <= 1.0 for r in rows)

        # The client drops the inference callback's return value; the summary travels as attributes,
        # as plain values: 1.0.7's AttributeMessage carries strings only, 1.1's records JSON values.
        summary = fleet.combiner.wait_until(
            lambda node=node: prediction_summary(fleet.combiner, node.name, final.aggregate_id),
            TASK_TIMEOUT, f"the prediction summary of {node.name}",
        )
        count, accuracy = summary["prediction_count"], summary["prediction_accuracy"]
        if CLIENT_LINE == "1.0.7":
            count, accuracy = int(count), float(accuracy)
        assert count == len(predict_set) and isinstance(count, int)
        assert Path(summary["prediction_output"]) == output
        # predict/ holds the labelled test shard: the same images validation scored.
        assert accuracy == pytest.approx(final.validations[node.name]["test_accuracy"], abs=2 / len(rows))


# -- the edges --------------------------------------------------------------------------------


def test_an_aborted_training_task_ends_interrupted_without_upload(fleet: Fleet, seed_id: str) -> None:
    combiner, round_id = fleet.combiner, "aborted"
    # batch_size 1 makes one epoch thousands of batches: a package that checked for abort only
    # between epochs would miss the deadline below by seconds.
    settings = {"epochs": 20, "batch_size": 1, "learning_rate": 0.01, "optimizer": "sgd", "seed": 0}
    ids = {c: combiner.submit_task(c, TRAIN, seed_id, {"client_settings": settings}, round_id=round_id)
           for c in fleet.ids}
    combiner.wait_until(  # training is under way on every client once it reports a training_loss
        lambda: all(any((m.client_id, m.round_id) == (c, round_id) for m in combiner.metrics)
                    for c in fleet.ids),
        TASK_TIMEOUT, "every client to report training_loss in the aborted round",
    )
    uploads_before = len(combiner.uploads)
    for cid in ids.values():
        combiner.interrupt(cid)
    tasks = combiner.wait_for_tasks(ids.values(), TASK_TIMEOUT)

    assert [t.status for t in tasks] == ["INTERRUPTED"] * CLIENTS, [(t.status, t.response) for t in tasks]
    assert not [u for u in combiner.updates if u.correlation_id in ids.values()]
    assert len(combiner.uploads) == uploads_before
    for t in tasks:
        # Delivered with one poll, seen at the next batch, reported with the next poll.
        stopped_after = t.finished_at - t.interrupt_delivered_at
        assert stopped_after <= POLL + BATCH_ALLOWANCE, f"{t.client_id} took {stopped_after:.1f} s to stop"


def test_invalid_settings_fail_the_round_naming_the_key_then_clients_serve_the_next(
    fleet: Fleet, seed_id: str
) -> None:
    combiner = fleet.combiner
    bad = {"client-0": ({"epochs": 0}, "'epochs'"),
           "client-1": ({"optimizer": "rmsprop"}, "'optimizer'"),
           "client-2": ({"learning_rte": 0.1}, "'learning_rte'")}
    ids = {c: combiner.submit_task(c, TRAIN, seed_id, {"client_settings": s}, round_id="invalid")
           for c, (s, _) in bad.items()}
    for client, task in zip(ids, combiner.wait_for_tasks(ids.values(), TASK_TIMEOUT)):
        assert task.status == "FAILED", (client, task.status, task.response)
        assert bad[client][1] in task.response["error"], task.response
    assert not [u for u in combiner.updates if u.correlation_id in ids.values()]

    next_round = {"client_settings": {"epochs": 1, "batch_size": 64}}
    tasks = run_all(fleet, TRAIN, seed_id, next_round, "after-invalid")
    assert_all(tasks, "COMPLETED")
    served = {u.client_id for u in combiner.updates if u.round_id == "after-invalid"}
    assert served == set(fleet.ids)


def test_a_model_that_does_not_fit_is_named_in_the_log_though_validation_reports_completed(
    fleet: Fleet, seed_id: str
) -> None:
    """Client quirk: a validate callback that raises is reported COMPLETED, with no metrics."""
    node, combiner = fleet.nodes[0], fleet.combiner
    wrong_id = combiner.put_model([np.zeros((3, 3), np.float32)])
    [task] = combiner.wait_for_tasks(
        [combiner.submit_task(node.name, VALIDATE, wrong_id, round_id="wrong-model")], TASK_TIMEOUT
    )
    assert task.status == "COMPLETED"
    # A later validation from the same node has arrived; one for the wrong model would have come
    # first (1.1 sends its queued validations in order), so none was sent.
    later = combiner.submit_task(node.name, VALIDATE, seed_id, round_id="after-wrong-model")
    combiner.wait_for_messages(combiner.validations, [later], TASK_TIMEOUT, "the next ModelValidation")
    assert not [v for v in combiner.validations if v.correlation_id == task.correlation_id]
    assert f"model {wrong_id}: expected 8 parameter arrays" in node.log_tail(20_000)
    # The reason reached the server as a plain string attribute.
    assert "expected 8 parameter arrays" in combiner.attributes_of(node.name)["validation_error"]


def test_telemetry_reaches_the_combiner_from_every_client(fleet: Fleet) -> None:
    """memory_usage and cpu_usage every 5 s: 1.0.7 as TelemetryMessage pairs, 1.1 as records."""
    combiner = fleet.combiner

    def reported() -> set[str]:
        keys: dict[str, set[str]] = {}
        for t in combiner.telemetry:
            pairs = [e.key for e in t.telemetries] if isinstance(t, msg.TelemetryMessage) else [t.key]
            keys.setdefault(t.client_id, set()).update(pairs)
        return {c for c, k in keys.items() if {"memory_usage", "cpu_usage"} <= k}

    combiner.wait_until(lambda: reported() >= set(fleet.ids), 30, "memory_usage and cpu_usage from every client")
    if CLIENT_LINE == "1.1":
        records = [t for t in combiner.telemetry if t.key == "cpu_usage"]
        assert all(0.0 <= json.loads(t.payload)["value"] <= 100.0 for t in records), records[:3]


@pytest.mark.skipif(CLIENT_LINE != "1.1", reason="heartbeats, backlog reports and poll_interval_ms are 1.1's")
def test_heartbeats_backlog_reports_and_poll_interval_reach_the_combiner(fleet: Fleet) -> None:
    combiner = fleet.combiner
    assert {c: combiner.poll_intervals_ms.get(c) for c in fleet.ids} == {c: {POLL * 1000} for c in fleet.ids}
    beating = {h.client_id for h in combiner.heartbeats if h.heartbeat_interval_ms == 2000}
    assert beating == set(fleet.ids), combiner.heartbeats[:3]
    # Every 30 s from the start; the rounds before this test took longer than that.
    combiner.wait_until(lambda: {r.client_id for r in combiner.backlog_reports} >= set(fleet.ids), 40,
                        "a backlog report from every client")
    assert all(r.backlog_dropped_total == 0 for r in combiner.backlog_reports), combiner.backlog_reports


def test_clients_shut_down_cleanly_before_the_combiner(fleet: Fleet) -> None:
    """Last, once every task has finished (a task still under way when SIGTERM arrives may keep its
    model's temp ZIP: the client does not wait for it): SIGTERM each client by pid, then stop the
    combiner and check its ports closed and no temp file left."""
    fleet.combiner.wait_for_tasks(fleet.combiner.tasks_by_id(), TASK_TIMEOUT)
    for node in fleet.nodes:
        node.sigterm()
    for node in fleet.nodes:
        assert node.wait_exit() == 0, node.log_tail()
    disconnected = {a.client_id for a in fleet.combiner.announces if a.type == "Disconnect"}
    assert disconnected == set(fleet.ids)
    assert fleet.combiner.protocol_errors == []
    ports = (fleet.combiner.port, fleet.combiner.http_port)
    fleet.combiner.stop()
    for port in ports:
        with socket.socket() as probe:
            probe.settimeout(2)
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
    for node in fleet.nodes:  # e.g. the temp ZIPs every ScaleoutModel owns
        leftovers = [p for p in (node.workdir / "tmp").rglob("*") if p.is_file()]
        assert not leftovers, f"{node.name} left temp files: {leftovers[:3]}"

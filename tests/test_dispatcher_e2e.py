"""The dispatcher package inside two real ``scaleout client start --dispatcher`` processes.

An operator's path with the legacy dispatcher architecture: ``make package-dispatcher``
(``dispatcher/assemble.py``, then ``scaleout package create``), unpack it where each node runs,
start two clients against a combiner (the loopback :class:`combiner.TestCombiner`), then a FedAvg
round: train from the seed, aggregate, validate. Each task runs ``python -m mnist_edge.dispatch``
in a subprocess of the package's managed environment (made offline here, see
:func:`e2e_helpers.satisfied_env`), importing the library the package ships. Then the edge an
operator meets first: a round with a bad setting fails, and the server reads which one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from combiner import TRAIN, VALIDATE, Task, TestCombiner
from conftest import shards_fingerprint
from e2e_helpers import (
    EdgeNode,
    Fleet,
    dispatcher_tarball,
    fedavg,
    prepare_shards,
    satisfied_env,
    unpack,
)
from mnist_edge import data

pytestmark = pytest.mark.e2e

CLIENTS = 2
TEST_FRACTION = 0.8  # of mnist5k's 5,000 images: 500 train and 2,000 held-out per client
POLL = 1
READY_TIMEOUT = 120  # the startup command imports torch once before the client connects
TASK_TIMEOUT = 120  # each task starts a Python that imports torch


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory, seed_path: Path) -> Iterator[tuple[Fleet, str]]:
    root = tmp_path_factory.mktemp("dispatcher")
    tarball = dispatcher_tarball(root / "dist")
    data_dirs = prepare_shards(root / "data", CLIENTS, TEST_FRACTION)
    nodes = []
    for i, data_dir in enumerate(data_dirs):
        workdir = root / f"node-{i}"
        satisfied_env(unpack(tarball, workdir))
        nodes.append(EdgeNode(f"dispatched-{i}", workdir, data_dir, dispatcher=True))
    fleet = Fleet(TestCombiner(), nodes)
    with fleet.running(POLL, seed_path, READY_TIMEOUT) as seed_id:
        yield fleet, seed_id


def run_all(fleet: Fleet, task_type: str, model_id: str, data: dict) -> dict[str, Task]:
    ids = {c: fleet.combiner.submit_task(c, task_type, model_id, data, round_id="round-1") for c in fleet.ids}
    fleet.combiner.wait_for_tasks(ids.values(), TASK_TIMEOUT)
    return {c: fleet.combiner.task(cid) for c, cid in ids.items()}


def test_a_round_trains_aggregates_and_validates_through_the_dispatcher(started: tuple[Fleet, str]) -> None:
    fleet, seed_id = started
    combiner = fleet.combiner
    settings = {"epochs": 1, "batch_size": 32, "learning_rate": 1.0, "optimizer": "adadelta", "seed": 1}
    train = run_all(fleet, TRAIN, seed_id, {"client_settings": settings})
    assert {c: t.status for c, t in train.items()} == dict.fromkeys(fleet.ids, "COMPLETED"), \
        {c: t.response for c, t in train.items()}
    by_task = combiner.wait_for_messages(combiner.updates, [t.correlation_id for t in train.values()],
                                         TASK_TIMEOUT, "ModelUpdate")
    metas = {c: json.loads(by_task[t.correlation_id].meta) for c, t in train.items()}
    for node in fleet.nodes:
        trained = metas[node.name]["training_metadata"]  # everything the command wrote beside OUT
        train_split = data.load_split(node.data_dir, "train")
        assert trained["num_examples"] == len(train_split)
        assert (trained["epochs"], trained["batch_size"], trained["seed"]) == (1, 32, 1)
        assert trained["data_fingerprint"] == shards_fingerprint(sorted((node.data_dir / "train").glob("*.csv")))
        assert 0.0 <= trained["training_accuracy"] <= 1.0 and math.isfinite(trained["training_loss"])

    updates = [by_task[train[c].correlation_id].model_update_id for c in fleet.ids]
    aggregate = fedavg(combiner, updates, [metas[c]["training_metadata"]["num_examples"] for c in fleet.ids])
    seed = combiner.get_params(seed_id)
    assert all(np.isfinite(a).all() for a in aggregate)
    assert any(not np.array_equal(a, s) for a, s in zip(aggregate, seed, strict=True)), "training changed nothing"

    validate = run_all(fleet, VALIDATE, combiner.put_model(aggregate), {})
    received = combiner.wait_for_messages(combiner.validations, [t.correlation_id for t in validate.values()],
                                          TASK_TIMEOUT, "ModelValidation")
    for node in fleet.nodes:
        metrics = json.loads(received[validate[node.name].correlation_id].data)
        assert metrics["num_test_examples"] == len(data.load_split(node.data_dir, "test"))
        assert metrics["num_train_examples"] == len(data.load_split(node.data_dir, "train"))
        # One epoch of Adadelta on 500 images already beats chance (0.1) by far.
        assert metrics["test_accuracy"] > 0.5, metrics


def test_a_bad_setting_fails_the_task_and_the_server_reads_which(started: tuple[Fleet, str]) -> None:
    fleet, seed_id = started
    uploads_before = len(fleet.combiner.uploads)
    tasks = run_all(fleet, TRAIN, seed_id, {"client_settings": {"epochz": 1}})
    for task in tasks.values():
        # The dispatcher keeps only this check's text of what the command wrote (see mnist_edge.dispatch).
        assert task.status == "FAILED"
        assert "unknown setting 'epochz'; accepted settings are: " in task.response["error"], task.response
    assert len(fleet.combiner.uploads) == uploads_before  # refused before anything was uploaded

"""Node-owned DP in three real ``scaleout client start`` processes.

client-0 has a small budget planned for two rounds (``MNIST_EDGE_DP_EPSILON`` with room for two
rounds at the σ the rounds ask, ``MNIST_EDGE_DP_ROUNDS=2``), client-1 a large one (planned for
the default 10 rounds, so its plan asks less noise than the rounds do), client-2 none (DP only
because the rounds ask for it). Four FedAvg rounds, each asking σ 1.0: every node trains at
σ 1.0 (a round may ask more noise than the plan); from round 3 on client-0 FAILs each train task
before training, naming its budget and its planned rounds, and uploads nothing, while the others
go on. Expected ε values come from Opacus's ``RDPAccountant``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from combiner import TRAIN, TestCombiner
from e2e_helpers import EdgeNode, Fleet, fedavg, package_tarball, prepare_shards, unpack
from mnist_edge import data, ledger
from mnist_edge.node import LEDGER_NAME, STATE_DIR

pytestmark = pytest.mark.e2e

TEST_FRACTION = 0.6  # 666 or 667 train images per client
BATCH = 32
POLL = 1
READY_TIMEOUT = 120
TASK_TIMEOUT = 240  # a DP round of three clients on two busy cores
ROUNDS = 4
ALLOWED = 2  # rounds that fit client-0's budget


def round_settings(number: int) -> dict:
    return {"epochs": 1, "batch_size": BATCH, "seed": number, "dp_noise_multiplier": 1.0, "dp_max_grad_norm": 1.0}


def spent(n_train: int, rounds: int) -> float:
    q = BATCH / n_train
    accountant = RDPAccountant()
    accountant.history = [(1.0, q, int(1 / q))] * rounds
    return accountant.get_epsilon(1e-5)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, seed_path: Path) -> Iterator[tuple[Fleet, str, int]]:
    root = tmp_path_factory.mktemp("dp-e2e")
    tarball = package_tarball(root / "dist")
    data_dirs = prepare_shards(root / "data", 3, TEST_FRACTION)
    n_train = len(data.load_split(data_dirs[0], "train"))
    small = (spent(n_train, ALLOWED) + spent(n_train, ALLOWED + 1)) / 2
    budgets = [{"MNIST_EDGE_DP_EPSILON": repr(small), "MNIST_EDGE_DP_ROUNDS": str(ALLOWED)},
               {"MNIST_EDGE_DP_EPSILON": "50"}, {}]
    nodes = []
    for i, (data_dir, env) in enumerate(zip(data_dirs, budgets, strict=True)):
        workdir = root / f"node-{i}"
        unpack(tarball, workdir)
        nodes.append(EdgeNode(f"client-{i}", workdir, data_dir, env=env))
    fleet = Fleet(TestCombiner(), nodes)
    with fleet.running(POLL, seed_path, READY_TIMEOUT) as seed_id:
        yield fleet, seed_id, n_train


@pytest.fixture(scope="module")
def rounds(federation) -> list[dict]:
    """Four rounds; each: the tasks by client, the updates they sent, and the aggregate."""
    fleet, model_id, _ = federation
    combiner, history = fleet.combiner, []
    for number in range(1, ROUNDS + 1):
        uploads_before = len(combiner.uploads)
        ids = {c: combiner.submit_task(c, TRAIN, model_id, {"client_settings": round_settings(number)},
                                       round_id=f"dp-{number}") for c in fleet.ids}
        tasks = dict(zip(ids, combiner.wait_for_tasks(ids.values(), TASK_TIMEOUT), strict=True))
        updates = {u.client_id: u for u in combiner.updates if u.correlation_id in ids.values()}
        metas = {c: json.loads(u.meta) for c, u in updates.items()}
        if updates:
            model_id = combiner.put_model(fedavg(combiner, [u.model_update_id for u in updates.values()],
                                                 [metas[c]["training_metadata"]["num_examples"] for c in updates]))
        history.append({"tasks": tasks, "updates": updates, "metas": metas,
                        "uploads": len(combiner.uploads) - uploads_before,
                        "metric_clients": {m.client_id for m in combiner.metrics if m.round_id == f"dp-{number}"}})
    return history


def test_the_small_budget_node_fails_its_later_rounds_while_the_others_go_on(federation, rounds):
    fleet, _, n_train = federation
    for number, r in enumerate(rounds, start=1):
        statuses = {c: t.status for c, t in r["tasks"].items()}
        if number <= ALLOWED:
            assert statuses == dict.fromkeys(fleet.ids, "COMPLETED"), (number, statuses)
            continue
        assert statuses == {"client-0": "FAILED", "client-1": "COMPLETED", "client-2": "COMPLETED"}, statuses
        error = r["tasks"]["client-0"].response["error"]
        assert "no planned DP round is left (budget epsilon" in error, error
        assert f"planned {ALLOWED} DP round(s) (MNIST_EDGE_DP_ROUNDS) and has charged {ALLOWED}" in error, error
        assert set(r["updates"]) == {"client-1", "client-2"} and r["uploads"] == 2  # nothing left client-0
        assert "client-0" not in r["metric_clients"]  # not one batch ran


def test_every_update_carries_the_audit_numbers_and_matches_the_nodes_ledger(federation, rounds):
    fleet, _, _ = federation
    for node in fleet.nodes:
        n_train = len(data.load_split(node.data_dir, "train"))  # 667 or 666
        records = ledger.read(node.data_dir / STATE_DIR / LEDGER_NAME).records  # the ledger lives with the data
        trained = [r["metas"][node.name]["training_metadata"] for r in rounds if node.name in r["metas"]]
        assert len(records) == len(trained) == (ALLOWED if node.name == "client-0" else ROUNDS)
        for number, (meta, record) in enumerate(zip(trained, records, strict=True), start=1):
            assert meta["dp_epsilon_spent"] == record.epsilon_total == pytest.approx(spent(n_train, number))
            assert (meta["dp_noise_multiplier"], meta["dp_max_grad_norm"], meta["dp_delta"]) == (1.0, 1.0, 1e-5)
            assert meta["dp_sample_rate"] == BATCH / n_train and meta["dp_steps"] == int(1 / (BATCH / n_train))
            assert meta["precision"] == "fp32"
        assert {r.budget is None for r in records} == {node.name == "client-2"}


def test_clients_still_shut_down_cleanly(federation):
    fleet, _, _ = federation
    for node in fleet.nodes:
        node.sigterm()
    for node in fleet.nodes:
        assert node.wait_exit() == 0, node.log_tail()

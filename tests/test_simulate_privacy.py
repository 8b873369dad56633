"""`simulate --dp-budget`: every simulated node plans and keeps its own budget; a spent node sits rounds out.

Two clients of different size (100 and 400 real training images) plan the same budget over the same
rounds, so the small one needs more noise a round. Expected ε values come from Opacus's ``RDPAccountant``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from matplotlib.image import imread
from opacus.accountants import RDPAccountant

from conftest import make_node
from mnist_edge import ledger
from mnist_edge.cli import main
from mnist_edge.node import LEDGER_NAME
from mnist_edge.simulate import NODES_DIR

BUDGET = 6.0
PLANNED = 3  # --dp-rounds
ROUND = {"client-0": (50 / 100, 2), "client-1": (50 / 400, 8)}  # q, steps at batch 50


def spent(client: str, sigmas: list[float]) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, *ROUND[client]) for sigma in sigmas]
    return accountant.get_epsilon(1e-5)


@pytest.fixture(scope="module")
def clients_dir(tmp_path_factory, mnist5k) -> Path:
    images, labels = mnist5k
    root = tmp_path_factory.mktemp("clients")
    make_node(root / "client-0", images, labels, 100, 50, seed=0)
    make_node(root / "client-1", images, labels, 400, 50, seed=1)
    return root


def simulate(clients_dir: Path, out: Path, capsys) -> tuple[list[dict], str]:
    args = ["simulate", "--data", clients_dir, "--out", out, "--rounds", 6, "--batch-size", 50, "--no-progress",
            "--dp-budget", BUDGET, "--dp-rounds", PLANNED]
    assert main(list(map(str, args))) == 0
    with open(out / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle)), capsys.readouterr().out


@pytest.mark.slow
def test_each_node_plans_its_own_budget_and_sits_out_once_its_rounds_are_served(clients_dir, tmp_path, capsys):
    rows, printed = simulate(clients_dir, tmp_path / "run", capsys)

    trained = rows[1:]
    assert len(trained) == PLANNED  # then both nodes refuse and the simulation stops
    assert f"round {PLANNED + 1}: every chosen client's privacy budget refused it; stopping" in printed
    sigmas = {}
    for client in ROUND:
        records = ledger.read(tmp_path / "run" / NODES_DIR / client / LEDGER_NAME).records
        sigmas[client] = [r.noise_multiplier for r in records]
        assert len(records) == PLANNED
        assert records[-1].epsilon_total == pytest.approx(spent(client, sigmas[client]), rel=1e-9)
        assert records[-1].epsilon_total <= BUDGET and records[-1].epsilon_total == pytest.approx(BUDGET, rel=2e-3)
    assert sigmas["client-0"][0] > sigmas["client-1"][0]  # fewer images: more noise for the same budget
    for number, row in enumerate(trained, start=1):
        assert row["clients"] == "0 1" and row["refused"] == ""
        assert float(row["dp_epsilon_spent"]) == pytest.approx(
            max(spent(client, sigmas[client][:number]) for client in ROUND), rel=1e-6)
    assert f"epsilon spent {float(trained[0]['dp_epsilon_spent']):.3f}" in printed
    assert imread(tmp_path / "run" / "curves.png").shape[1] == 1500  # a third panel: epsilon per round

    again, _ = simulate(clients_dir, tmp_path / "run", capsys)  # a new federation: fresh ledgers
    assert [r["clients"] for r in again] == [r["clients"] for r in rows]

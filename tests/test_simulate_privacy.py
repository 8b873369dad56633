"""`simulate --dp-budget`: every simulated node keeps its own ledger; a spent node sits rounds out.

Two clients of different size (100 and 400 real training images) train with the same σ, so the
small one spends its budget faster. Expected ε values come from Opacus's ``RDPAccountant``.
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
ROUND = {"client-0": (1.0, 50 / 100, 2), "client-1": (1.0, 50 / 400, 8)}  # sigma, q, steps at batch 50


def spent(client: str, rounds: int) -> float:
    accountant = RDPAccountant()
    accountant.history = [ROUND[client]] * rounds
    return accountant.get_epsilon(1e-5)


def rounds_within_budget(client: str) -> int:
    rounds = 0
    while spent(client, rounds + 1) <= BUDGET:
        rounds += 1
    return rounds


@pytest.fixture(scope="module")
def clients_dir(tmp_path_factory, mnist5k) -> Path:
    images, labels = mnist5k
    root = tmp_path_factory.mktemp("clients")
    make_node(root / "client-0", images, labels, 100, 50, seed=0)
    make_node(root / "client-1", images, labels, 400, 50, seed=1)
    return root


def simulate(clients_dir: Path, out: Path, capsys) -> tuple[list[dict], str]:
    args = ["simulate", "--data", clients_dir, "--out", out, "--rounds", 6, "--batch-size", 50, "--no-progress",
            "--dp-noise-multiplier", 1.0, "--dp-budget", BUDGET]
    assert main(list(map(str, args))) == 0
    with open(out / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle)), capsys.readouterr().out


@pytest.mark.slow
def test_each_node_spends_its_own_budget_and_sits_out_once_it_is_spent(clients_dir, tmp_path, capsys):
    small, large = rounds_within_budget("client-0"), rounds_within_budget("client-1")
    assert 1 <= small < large < 6  # the setup this test needs
    rows, printed = simulate(clients_dir, tmp_path / "run", capsys)

    trained = rows[1:]
    assert len(trained) == large  # then both budgets refuse and the simulation stops
    assert f"round {large + 1}: every chosen client's privacy budget refused it; stopping" in printed
    for number, row in enumerate(trained, start=1):
        both = number <= small
        assert row["clients"] == ("0 1" if both else "1") and row["refused"] == ("" if both else "0")
        assert float(row["dp_epsilon_spent"]) == pytest.approx(
            max(spent("client-0", number) if both else 0.0, spent("client-1", number)), rel=1e-6)
        assert float(row["dp_epsilon_round"]) == pytest.approx(
            spent("client-0" if both else "client-1", 1), rel=1e-6)
    assert f"epsilon spent {float(trained[0]['dp_epsilon_spent']):.3f}" in printed and "refused: 0" in printed

    for client, expected in (("client-0", small), ("client-1", large)):
        records = ledger.read(tmp_path / "run" / NODES_DIR / client / LEDGER_NAME).records
        assert len(records) == expected and records[-1].epsilon_total == pytest.approx(spent(client, expected))
    assert imread(tmp_path / "run" / "curves.png").shape[1] == 1500  # a third panel: epsilon per round

    again, _ = simulate(clients_dir, tmp_path / "run", capsys)  # a new federation: fresh ledgers
    assert [r["clients"] for r in again] == [r["clients"] for r in rows]


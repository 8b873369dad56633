"""The ledger belongs to the data: one per data directory, wherever and however often it is served.

Real clients started as ``scaleout client start`` starts them (``test_edge.start``), real
``launch_clients``-style numbering, the data platform's module run in fresh UUID run directories.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_node
from mnist_edge import ledger, paths, privacy
from mnist_edge.node import LEDGER_NAME, STATE_DIR, NodeConfig, NodeConfigError
from test_edge import call, seed_model, start
from test_examples import finish, new_run, put, start_script, tables  # noqa: F401  (tables: a fixture)

ROUND = {"batch_size": 500, "dp_noise_multiplier": 1.0}  # 1,000 images: q 0.5, 2 steps


def client_in(root: Path, monkeypatch, data_dir: Path, **variables: str):
    """A client started in ``root/work`` (a fresh copy of the package each time) with these variables."""
    shutil.rmtree(root / "package", ignore_errors=True)
    monkeypatch.setenv("MNIST_EDGE_THREADS", str(torch.get_num_threads()))  # keep this process's threads
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return start(root, monkeypatch, data_dir)


def train(client, seed_path) -> dict:
    return call(client, client.train_callback, seed_model(seed_path), ROUND)[1]["training_metadata"]


def test_one_data_dir_served_from_two_working_directories_spends_one_budget(tmp_path, monkeypatch, node_dir,
                                                                              seed_path):
    """A restart elsewhere, or a second client on the same images, charges the same ledger."""
    budget = {"MNIST_EDGE_DP_EPSILON": "3", "MNIST_EDGE_DP_ROUNDS": "1"}  # the whole budget in one round
    first, _ = client_in(tmp_path / "a", monkeypatch, node_dir, **budget)
    assert train(first, seed_path)["dp_ledger_records"] == 1
    second, runtime = client_in(tmp_path / "b", monkeypatch, node_dir, **budget)
    with pytest.raises(privacy.BudgetExceeded, match="no planned DP round is left.*has charged 1"):
        train(second, seed_path)
    assert runtime.checks == 0
    assert ledger.read(node_dir / STATE_DIR / LEDGER_NAME).count == 1
    assert not list((tmp_path / "a").rglob(LEDGER_NAME)) and not list((tmp_path / "b").rglob(LEDGER_NAME))


def test_clients_numbered_under_one_root_in_one_working_directory_keep_one_ledger_each(
        tmp_path, monkeypatch, mnist5k, seed_path):
    """launch_clients starts N clients in one working directory with CLIENT_NUMBER 0..N-1 over the
    client-<n> layout: N datasets, N ledgers, never one mixing them."""
    images, labels = mnist5k
    root = tmp_path / "clients"
    for number in range(3):
        make_node(root / f"client-{number}", images, labels, 1000, 50, seed=number)
    for number in range(3):
        client, _ = client_in(tmp_path, monkeypatch, root, CLIENT_NUMBER=str(number), TOTAL_N_CLIENTS="3")
        for _ in range(2 if number == 1 else 1):
            train(client, seed_path)
    counts = [ledger.read(root / f"client-{n}" / STATE_DIR / LEDGER_NAME).count for n in range(3)]
    fingerprints = {r.data_fingerprint for n in range(3)
                    for r in ledger.read(root / f"client-{n}" / STATE_DIR / LEDGER_NAME).records}
    assert counts == [1, 2, 1] and len(fingerprints) == 3
    assert not list((tmp_path / "work").rglob(LEDGER_NAME)) and not (root / STATE_DIR).exists()


def test_an_old_ledger_in_the_working_directory_is_refused_until_it_is_moved(tmp_path, monkeypatch, node_dir,
                                                                            seed_path):
    """Ledgers used to live in the working directory: a node restarted there must not silently start a
    new budget in its data directory; it fails, telling the operator what to move where."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    old = workdir / LEDGER_NAME
    ledger.charge(old, model_id="m", data_fingerprint="f", noise_multiplier=1.0, max_grad_norm=1.0,
                  sample_rate=0.5, steps=2, delta=1e-5, budget=None)
    new = node_dir / STATE_DIR / LEDGER_NAME
    client, runtime = client_in(tmp_path, monkeypatch, node_dir, MNIST_EDGE_DP_EPSILON="8")
    with pytest.raises(NodeConfigError) as refused:
        train(client, seed_path)
    message = str(refused.value)
    assert message.startswith(f"{old}: a privacy ledger in the working directory")
    assert f"move the old ledger there (mkdir -p {new.parent} && mv {old} {new})" in message
    assert "MNIST_EDGE_DP_LEDGER" in message and runtime.checks == 0 and not new.exists()
    done = subprocess.run([sys.executable, "-m", "mnist_edge", "privacy"], cwd=workdir, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "SCALEOUT_DATA_DIR": str(node_dir)})
    assert done.returncode == 2 and done.stderr == f"error: {message}\n"

    new.parent.mkdir()
    shutil.move(old, new)  # what the message says
    client, _ = client_in(tmp_path, monkeypatch, node_dir, MNIST_EDGE_DP_EPSILON="8")
    assert train(client, seed_path)["dp_ledger_records"] == 2


def test_naming_the_ledger_keeps_an_old_one_where_it_is(tmp_path, monkeypatch, node_dir, seed_path):
    (tmp_path / "work").mkdir()
    old = tmp_path / "work" / LEDGER_NAME
    ledger.charge(old, model_id="m", data_fingerprint="f", noise_multiplier=1.0, max_grad_norm=1.0,
                  sample_rate=0.5, steps=2, delta=1e-5, budget=None)
    client, _ = client_in(tmp_path, monkeypatch, node_dir, MNIST_EDGE_DP_LEDGER=LEDGER_NAME)
    assert train(client, seed_path)["dp_ledger_records"] == 2 and not (node_dir / STATE_DIR).exists()


@pytest.mark.parametrize("output", [f"{STATE_DIR}/{LEDGER_NAME}", f"{STATE_DIR}/{LEDGER_NAME}.head",
                                    f"{STATE_DIR}/predictions.csv"])
def test_a_task_cannot_write_into_the_nodes_ledger(tmp_path, monkeypatch, node_dir, seed_path, output):
    client, _ = client_in(tmp_path, monkeypatch, node_dir, MNIST_EDGE_DP_EPSILON="8")
    train(client, seed_path)
    state = {p: p.read_bytes() for p in (node_dir / STATE_DIR).iterdir()}
    with pytest.raises(paths.PathError, match=r"leads into a hidden name \('.mnist-edge'\) of the data directory; "
                                              "the node's own files are not a task's"):
        call(client, client.inference_callback, seed_model(seed_path), {"data": "test", "output": output})
    assert {p: p.read_bytes() for p in (node_dir / STATE_DIR).iterdir()} == state


def test_the_node_config_puts_the_ledger_in_the_data_dir(tmp_path):
    node = NodeConfig.from_environment({"SCALEOUT_DATA_DIR": "shards"}, tmp_path, 2)
    assert node.privacy.ledger == tmp_path / "shards" / STATE_DIR / LEDGER_NAME


# -- the data platform's module: a fresh run directory every run ---------------------------------------


def test_a_data_platform_run_refuses_dp_without_a_ledger_that_outlives_it(tmp_path, tables):  # noqa: F811
    home = tmp_path / "home"
    home.mkdir()
    for ledger_variable, reason in (({}, "MNIST_EDGE_DP_LEDGER is not an absolute path"),
                                    ({"MNIST_EDGE_DP_LEDGER": "ledger.jsonl"}, "is not an absolute path"),
                                    ({"MNIST_EDGE_DP_LEDGER": "{run}/work/ledger.jsonl"}, "is inside this run's")):
        run = new_run(tmp_path, tmp_path / "application")
        put(tables["a"], run / "input" / "train_dataset" / "dataset.csv")
        variables = {k: v.format(run=run) for k, v in ledger_variable.items()}
        code, output = finish(start_script("train", run, home, MNIST_EDGE_DP_EPSILON="8", **variables))
        assert code == 2 and reason in output, output
        assert not list((run / "output").rglob("*.pth")) and not list(run.rglob(LEDGER_NAME))


def test_data_platform_runs_on_one_dataset_charge_one_persistent_ledger(tmp_path, tables):  # noqa: F811
    home = tmp_path / "home"
    home.mkdir()
    persistent = tmp_path / "ledgers" / "dataset-a.jsonl"
    for number in (1, 2):
        run = new_run(tmp_path, tmp_path / "application")
        put(tables["a"], run / "input" / "train_dataset" / "dataset.csv")
        code, output = finish(start_script("train", run, home, MNIST_EDGE_DP_EPSILON="50",
                                           MNIST_EDGE_DP_LEDGER=str(persistent)))
        assert code == 0, output
        assert ledger.read(persistent).count == number and not list(run.rglob(LEDGER_NAME))

"""`python -m mnist_edge simulate`: a short real federation (2 clients, 2 rounds) on real MNIST images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MODEL_CACHE
from mnist_edge import container, data, model, runtime, training
from mnist_edge.cli import main
from mnist_edge.prepare import prepare
from mnist_edge.simulate import fedavg, simulate

ARGS = ["--rounds", "2", "--batch-size", "16", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def clients_dir(tmp_path_factory, mnist5k) -> Path:
    """2 Dirichlet(1.0) clients sharing 400 real images (about 160 train / 40 test each)."""
    images, labels = mnist5k
    pick = np.random.default_rng(0).permutation(len(labels))[:400]
    source = tmp_path_factory.mktemp("source") / "mnist.npz"
    np.savez(source, x_train=images[pick], y_train=labels[pick], x_test=images[:0], y_test=labels[:0])
    out = tmp_path_factory.mktemp("clients")
    prepare(str(source), 2, out, seed=0, partition="dirichlet", alpha=1.0)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, clients_dir) -> Path:
    run = tmp_path_factory.mktemp("run")
    assert main(["simulate", "--data", str(clients_dir), "--out", str(run), *ARGS]) == 0
    return run


def read_history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_accuracy_rises_and_the_table_is_written(run_dir):
    rows = read_history(run_dir)
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["training_loss"] == "" and rows[0]["clients"] == ""
    assert [r["clients"] for r in rows[1:]] == ["0 1", "0 1"]
    accuracy = [float(r["test_accuracy"]) for r in rows]
    assert accuracy[0] < 0.3
    assert accuracy[2] > accuracy[0] + 0.3
    assert float(rows[2]["training_loss"]) < float(rows[1]["training_loss"])
    history = json.loads((run_dir / "history.json").read_text())
    assert history["config"]["clients"] == 2 and history["config"]["batch_size"] == 16
    assert [r["test_accuracy"] for r in history["rounds"]] == pytest.approx(accuracy, abs=1e-6)
    assert set(history["rounds"][2]["client_test_accuracy"]) == {"client-0", "client-1"}
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / MODEL_CACHE).is_dir()  # EdgeClient's cache goes into RUN, not the cwd


def test_global_accuracy_is_the_union_of_the_clients_test_splits(run_dir, clients_dir):
    """global.pth loads into the CNN (weights only) and scores exactly what the history says."""
    net = model.Net()
    net.load_state_dict(torch.load(run_dir / "global.pth", weights_only=True), strict=True)
    tests = [data.load_split(clients_dir / f"client-{i}", "test") for i in range(2)]
    _loss, union = training.evaluate(net, np.concatenate([t.images for t in tests]),
                                     np.concatenate([t.labels for t in tests]), torch.device("cpu"))
    final = read_history(run_dir)[-1]
    assert union == pytest.approx(float(final["test_accuracy"]), abs=1e-6)
    _loss, first = training.evaluate(net, tests[0].images, tests[0].labels, torch.device("cpu"))
    assert first == pytest.approx(float(final["test_accuracy_client-0"]), abs=1e-6)
    npz = model.load_npz(run_dir / "global.npz")
    assert all(np.array_equal(a, b) for a, b in zip(npz, model.get_parameters(net)))


def test_global_model_seeds_the_next_run_and_same_seed_same_history(run_dir, clients_dir, tmp_path):
    """One client per round from the saved global model, twice: identical histories."""
    runs = [simulate(clients_dir, 1, tmp_path / name, batch_size=32, clients_per_round=1, seed=5,
                     init=run_dir / "global.npz", progress=False, echo=lambda line: None) for name in "ab"]
    start = json.loads((run_dir / "history.json").read_text())["rounds"][-1]
    assert runs[0][0].test_accuracy == pytest.approx(start["test_accuracy"], abs=1e-6)
    assert len(runs[0][1].clients) == 1
    assert runs[0][1].test_accuracy != runs[0][0].test_accuracy  # it did train

    def without_time(path: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in read_history(path)]

    assert without_time(tmp_path / "a") == without_time(tmp_path / "b")
    assert (tmp_path / "a" / "global.npz").read_bytes() == (tmp_path / "b" / "global.npz").read_bytes()


def test_fedavg_weights_by_num_examples():
    a = [np.zeros((2, 2), np.float32), np.ones(3, np.float32)]
    b = [np.full((2, 2), 4, np.float32), np.full(3, 5, np.float32)]
    average = fedavg([(a, 300), (b, 100)])
    assert np.allclose(average[0], 1.0) and np.allclose(average[1], 2.0)
    assert average[0].dtype == np.float32


def test_a_round_is_the_clients_models_weighted_by_their_examples(tmp_path, mnist5k, monkeypatch):
    """Clients of 400 and 40 training images, one round: the global model must be the
    ``num_examples``-weighted mean of the two models the clients sent (recorded on their way to the
    server), computed here with numpy; the round's training_loss is weighted the same way. Clients of
    such different sizes make a plain mean far from it.
    """
    images, labels = mnist5k
    for i, (first, n) in enumerate([(0, 400), (400, 40)]):
        client = tmp_path / "data" / f"client-{i}"
        data.write_shard(client / "train" / "s.csv", images[first : first + n], labels[first : first + n])
        data.write_shard(client / "test" / "s.csv", images[4000:4020], labels[4000:4020])
    sent = []
    run_task = runtime.run_task

    def recording(client, task, *args, **kwargs):
        local, meta = run_task(client, task, *args, **kwargs)
        sent.append((container.params_from(local), meta["training_metadata"]["training_loss"]))
        return local, meta

    monkeypatch.setattr(runtime, "run_task", recording)
    history = simulate(tmp_path / "data", 1, tmp_path / "run", batch_size=40, seed=1, progress=False,
                       echo=lambda line: None)
    (big, big_loss), (small, small_loss) = sent
    expected = [np.average([b, s], axis=0, weights=[400, 40]) for b, s in zip(big, small)]
    for got, want in zip(model.load_npz(tmp_path / "run" / "global.npz"), expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert history[1].training_loss == pytest.approx((400 * big_loss + 40 * small_loss) / 440)


@pytest.mark.parametrize("extra, message", [
    (["--clients-per-round", "3"], "--clients-per-round must be between 1 and 2, got 3"),
    (["--clients-per-round", "0"], "--clients-per-round must be between 1 and 2, got 0"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--batch-size", "0"], "setting 'batch_size' must be an integer from 1 to 1024, got 0"),
])
def test_bad_arguments_exit_2_with_message(clients_dir, tmp_path, capsys, extra, message):
    args = ["simulate", "--data", str(clients_dir), "--out", str(tmp_path / "run"), "--rounds", "1", *extra]
    assert main(args) == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_directory_without_clients_is_refused(tmp_path, capsys):
    assert main(["simulate", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--rounds", "1"]) == 2
    assert "no client-<i> directories (run `python -m mnist_edge prepare` first)" in capsys.readouterr().err


def test_progress_off_a_terminal_is_plain_lines(clients_dir, tmp_path, capsys):
    simulate(clients_dir, 1, tmp_path / "run", batch_size=16, seed=3, echo=lambda line: None)
    err = capsys.readouterr().err
    assert "round 1/1: 50 % (1/2 clients)\nround 1/1: 100 % (2/2 clients)\n" in err and "\r" not in err

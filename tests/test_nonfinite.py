"""No non-finite model enters or leaves a node, and a diverging round fails instead of uploading NaN.

Through a real ``EdgeClient`` (in-process runtime): incoming models with NaN, infinity or float64
values beyond float32 fail train, validate and predict with a named error; settings that
diverge fail with "training diverged (...)"; ``simulate`` stops with a clear error and writes
no ``global.npz``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hostile import node, scaleout_model, seed_params
from mnist_edge import cli, data, model, runtime, training
from mnist_edge.model import ModelFileError
from mnist_edge.prepare import prepare
from mnist_edge.simulate import SimulationError, train_round
from mnist_edge.training import TrainingDiverged


@pytest.fixture
def edge_node(node_dir, mnist5k, tmp_path):
    images, _ = mnist5k
    data.write_shard(node_dir / "predict" / "p.csv", images[:10], np.full(10, data.NO_LABEL))
    return node(node_dir, workdir=tmp_path / "work")


def poisoned(seed_path, value: float, dtype=np.float32) -> list[np.ndarray]:
    params = [p.astype(dtype) for p in seed_params(seed_path)]
    params[4][3, 7] = value  # fc1.weight
    return params


@pytest.mark.parametrize("value,dtype,message", [
    (np.nan, np.float32, r"array 4 \(fc1.weight\) holds 1 non-finite values \(NaN or infinity\)"),
    (np.inf, np.float32, r"array 4 \(fc1.weight\) holds 1 non-finite values"),
    (-np.inf, np.float64, r"array 4 \(fc1.weight\) holds 1 non-finite values"),
    (1e39, np.float64, r"array 4 \(fc1.weight\) overflows float32 \(largest magnitude 1e\+39"),
], ids=["nan", "inf", "float64-inf", "float64-overflow"])
def test_a_non_finite_incoming_model_fails_every_task(edge_node, seed_path, value, dtype, message):
    incoming = scaleout_model(poisoned(seed_path, value, dtype))
    with pytest.raises(ModelFileError, match=message):
        edge_node.run("train", incoming, {})
    with pytest.raises(ModelFileError, match=message):
        edge_node.run("validate", incoming)
    assert "non-finite" in edge_node.runtime.attributes[-1]["validation_error"] or \
        "overflows" in edge_node.runtime.attributes[-1]["validation_error"]
    with pytest.raises(ModelFileError, match=message):
        edge_node.run("predict", incoming, {})
    assert not (edge_node.data_dir / "predictions").exists()
    assert edge_node.runtime.metrics == []


def test_a_diverging_round_fails_and_returns_no_model(edge_node, seed_path):
    with pytest.raises(TrainingDiverged, match=r"^training diverged \(loss nan at batch \d+\)"):
        edge_node.run("train", scaleout_model(seed_params(seed_path)),
                      {"optimizer": "sgd", "learning_rate": 1000, "batch_size": 32, "seed": 1})


def test_weights_that_overflow_in_the_last_step_are_caught_after_training(edge_node, seed_path, mnist5k):
    """One batch: its loss (computed before the step) is finite, the step sends the weights to inf."""
    images, labels = mnist5k
    pick = np.random.default_rng(0).permutation(len(labels))[:64]
    data.write_shard(edge_node.data_dir / "train" / "shard-000.csv", images[pick], labels[pick])
    params = seed_params(seed_path)
    params[6] = params[6] * np.float32(1e37)  # fc2.weight: finite, but its gradients are not small
    with pytest.raises(TrainingDiverged, match=r"weights not finite after batch 1"):
        edge_node.run("train", scaleout_model(params),
                      {"optimizer": "sgd", "learning_rate": 1000, "batch_size": 1024, "seed": 1, "precision": "fp32"})


def test_the_weight_check_itself():
    net = model.Net()
    training.check_finite_weights(net, 3)
    with torch.no_grad():
        net.conv2.bias[5] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"weights not finite after batch 3"):
        training.check_finite_weights(net, 3)


def test_model_files_with_non_finite_values_are_refused(seed_path, tmp_path):
    path = tmp_path / "nan.npz"
    np.savez(path, **{str(i): p for i, p in enumerate(poisoned(seed_path, np.nan))})
    with pytest.raises(ModelFileError, match="nan.npz: array 4 .* non-finite"):
        model.load_npz(path)
    torch.save(model.parameters_to_state_dict(seed_params(seed_path)) | {"fc1.weight": torch.full((128, 9216), np.inf)},
               tmp_path / "inf.pth")
    with pytest.raises(ModelFileError, match="inf.pth: array 4 .* non-finite"):
        model.load_pth(tmp_path / "inf.pth")
    with pytest.raises(ModelFileError, match="non-finite"):
        model.save_npz(poisoned(seed_path, np.nan), tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


@pytest.fixture(scope="module")
def two_clients(tmp_path_factory, mnist5k):
    images, labels = mnist5k
    pick = np.random.default_rng(1).permutation(len(labels))[:300]
    source = tmp_path_factory.mktemp("src") / "mnist.npz"
    np.savez(source, x_train=images[pick], y_train=labels[pick], x_test=images[:0], y_test=labels[:0])
    out = tmp_path_factory.mktemp("clients")
    prepare(str(source), 2, out, seed=0)
    return out


def test_simulate_refuses_a_non_finite_start_model(two_clients, seed_path, tmp_path, capsys):
    bad = tmp_path / "nan.npz"
    np.savez(bad, **{str(i): p for i, p in enumerate(poisoned(seed_path, np.nan))})
    code = cli.main(["simulate", "--data", str(two_clients), "--rounds", "1", "--init", str(bad),
                     "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2 and "nan.npz: array 4 (fc1.weight) holds 1 non-finite values" in capsys.readouterr().err
    assert not (tmp_path / "run" / "global.npz").exists()


def test_a_diverging_simulated_round_stops_the_simulation(two_clients, seed_path, tmp_path):
    clients = [runtime.local_client(two_clients / f"client-{i}", workdir=tmp_path) for i in range(2)]
    settings = {"optimizer": "sgd", "learning_rate": 1000, "batch_size": 16}
    with pytest.raises(SimulationError, match=r"round 1, client-0: training diverged \(loss nan at batch \d+\).*"
                                              "the simulation stopped and wrote no model"):
        chosen = list(enumerate(clients))
        train_round(chosen, seed_params(seed_path), settings, 0, 1, "round 1", False)

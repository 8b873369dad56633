"""Standalone train / predict / export / import, as a data platform or a pipeline calls them."""

from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shards_fingerprint
from hostile import Evil
from mnist_edge import cli, data, model
from mnist_edge.model import ModelFileError


def run_cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnist_edge", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def read_result(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, mnist5k) -> dict[str, Path]:
    """Real MNIST images: a train directory of two shards (raw and PNG), labelled and unlabelled shards."""
    images, labels = mnist5k
    root = tmp_path_factory.mktemp("shards")
    order = np.random.default_rng(6).permutation(len(labels))
    train, test, unlabelled = order[:200], order[200:400], order[400:450]
    data.write_shard(root / "train" / "a.csv", images[train[:100]], labels[train[:100]], train[:100])
    rest = train[100:]
    data.write_shard(root / "train" / "b.csv", images[rest], labels[rest], rest, fmt="png")
    data.write_shard(root / "test.csv", images[test], labels[test], test)
    data.write_shard(root / "unlabelled.csv", images[unlabelled], np.full(50, data.NO_LABEL), unlabelled)
    data.write_shard(root / "small.csv", images[unlabelled], labels[unlabelled], unlabelled)
    return {name: root / name for name in ("train", "test.csv", "unlabelled.csv", "small.csv")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards) -> tuple[Path, subprocess.CompletedProcess]:
    """One real ``train`` run (the data platform's spelling ``--epoch``), shared by the tests."""
    out = tmp_path_factory.mktemp("train") / "models" / "mnist.pth"
    done = run_cli("train", "--model", out, "--epoch", 1, "--seed", 3, "--batch-size", 50, shards["train"])
    assert done.returncode == 0, done.stderr
    return out, done


# -- the user's path ------------------------------------------------------------------------------


def test_train_writes_a_plain_state_dict_and_its_metadata(trained, shards):
    """The meta's ``data_fingerprint`` is the sha256 of the two shard files, computed here from the files
    (not with ``data``, which would agree with any fingerprint mnist_edge computes)."""
    out, done = trained
    assert "trained 200 images for 1 epoch(s)" in done.stdout
    assert "train: 100 % (4/4 batches)" in done.stderr and "\r" not in done.stderr  # a log, not a terminal
    net = model.Net()
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    start = model.new_model(3).state_dict()  # --seed 3 fixes the initial weights
    assert not torch.equal(net.state_dict()["fc1.weight"], start["fc1.weight"])
    meta = json.loads(out.with_name("mnist.xdata-meta.json").read_text())
    assert meta["model_kind"] == "mnist"
    assert meta["num_examples"] == 200 and meta["epochs"] == 1 and meta["batch_size"] == 50
    assert meta["data_fingerprint"] == shards_fingerprint([shards["train"] / "a.csv", shards["train"] / "b.csv"])
    assert 0 < meta["training_loss"] and 0 <= meta["training_accuracy"] <= 1
    assert meta["created_at"].endswith("+00:00")


def test_predict_with_the_trained_pth_writes_result_csv_into_a_directory(trained, shards, tmp_path):
    done = run_cli("predict", "--model", trained[0], shards["test.csv"], tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read_result(tmp_path / "result.csv")
    assert list(rows[0]) == ["image_id", "label", "confidence"]
    expected = data.load_dataset(shards["test.csv"])
    assert [int(r["image_id"]) for r in rows] == expected.image_ids.tolist()
    accuracy = np.mean([int(r["label"]) == y for r, y in zip(rows, expected.labels)])
    assert f"accuracy {accuracy:.4f} on 200 labelled images" in done.stdout


def test_predict_with_the_seed_npz_on_unlabelled_rows(seed_path, shards, tmp_path):
    done = run_cli("predict", "--model", seed_path, shards["unlabelled.csv"], tmp_path / "out" / "pred.csv")
    assert done.returncode == 0, done.stderr
    assert "accuracy" not in done.stdout
    rows = read_result(tmp_path / "out" / "pred.csv")
    assert len(rows) == 50
    assert all(r["label"] in "0123456789" and 0 < float(r["confidence"]) <= 1 for r in rows)


def test_export_then_import_gives_back_the_seed_byte_for_byte(seed_path, tmp_path):
    done = run_cli("export", seed_path, tmp_path / "seed.pth")
    assert done.returncode == 0, done.stderr
    assert "1,199,882 parameters" in done.stdout
    state = torch.load(tmp_path / "seed.pth", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == model.expected_shapes()
    assert cli.main(["import", str(tmp_path / "seed.pth"), str(tmp_path / "back.npz")]) == 0  # in-process
    assert (tmp_path / "back.npz").read_bytes() == seed_path.read_bytes()


def test_train_can_start_from_a_model_and_write_the_federation_npz(trained, shards, tmp_path, capsys):
    # In-process (same parser and error handling as the subprocess runs above), on 50 images.
    assert cli.main(["train", "--init", str(trained[0]), "--model", str(tmp_path / "global.npz"),
                     "--optimizer", "sgd", "--learning-rate", "0.01", str(shards["small.csv"])]) == 0
    assert "trained 50 images" in capsys.readouterr().out
    assert len(model.load_npz(tmp_path / "global.npz")) == 8
    meta = json.loads((tmp_path / "global.xdata-meta.json").read_text())
    assert meta["init"] == str(trained[0]) and meta["optimizer"] == "sgd" and meta["learning_rate"] == 0.01


# -- bad input ------------------------------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path, monkeypatch) -> Path:
    """A working directory with an empty shard, a pickle named .npz and a .pth of the wrong shape."""
    (tmp_path / "header-only.csv").write_text("image_id,label,image\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "evil.npz").write_bytes(pickle.dumps(Evil(tmp_path / "executed")))
    state = model.parameters_to_state_dict(model.get_parameters(model.Net()))
    state["fc1.weight"] = torch.zeros(64, 9216)
    torch.save(state, tmp_path / "narrow.pth")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_pickle_disguised_as_npz_fails_in_a_real_process_without_running(bad_files, shards):
    done = run_cli("predict", "--model", "evil.npz", shards["test.csv"], "r.csv", cwd=bad_files)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: evil.npz: not a model file, expected a numpy .npz (zip of .npy arrays) or a PyTorch .pth "
        "(torch.save zip); other pickles are refused (File is not a zip file)"
    )
    assert not (bad_files / "executed").exists() and not (bad_files / "r.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "m.pth", "missing.csv"], "missing.csv: no such file or directory"),
    (["train", "--model", "m.pth", "header-only.csv"], "header-only.csv: no valid rows"),
    (["train", "--model", "m.pth", "empty.csv"], "empty.csv: empty file, expected a header row"),
    (["train", "--model", "m.pth", "--epochs", "0", "header-only.csv"],
     "setting 'epochs' must be an integer from 1 to 1000, got 0"),
    (["train", "--model", "m.pth", "--init", "narrow.pth", "header-only.csv"],
     "narrow.pth: fc1.weight expected shape"),
    (["predict", "--model", "missing.pth", "header-only.csv", "r.csv"], "missing.pth: no such model file"),
    (["predict", "--model", "narrow.pth", "header-only.csv", "r.csv"],
     "narrow.pth: fc1.weight expected shape (128, 9216), got (64, 9216)"),
    (["predict", "--model", "header-only.csv", "header-only.csv", "r.csv"],
     "header-only.csv: not a model file"),
    (["export", "narrow.pth", "x.pth"],
     "narrow.pth: is a PyTorch .pth state_dict, 'export' reads a numpy .npz"),
    (["export", "evil.npz", "x.pth"], "evil.npz: not a model file"),
    (["import", "narrow.pth", "x.npz"], "narrow.pth: fc1.weight expected shape (128, 9216), got (64, 9216)"),
    (["import", "narrow.pth", "x.pth"],
     "x.pth: 'import' writes a numpy .npz parameter file, not a .pth file"),
    (["export", "../seed-missing.npz", "x.pth"], "../seed-missing.npz: no such model file"),
])
def test_bad_input_exits_2_with_one_line_naming_the_problem(bad_files, capsys, args, message):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (bad_files / "executed").exists()
    assert not any((bad_files / name).exists() for name in ("m.pth", "r.csv", "x.pth", "x.npz"))


def test_an_unwritable_output_exits_2_naming_the_path(bad_files, seed_path, capsys):
    assert cli.main(["export", str(seed_path), "header-only.csv/x.pth"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "header-only.csv" in err and "\n" not in err


# -- model files (in-process: the loaders themselves) ---------------------------------------------


def test_kind_comes_from_the_content_not_the_name(seed_path, tmp_path):
    renamed = tmp_path / "model.pth"
    renamed.write_bytes(seed_path.read_bytes())
    assert model.model_file_kind(renamed) == "npz"
    assert len(model.load_model_file(renamed)) == 8
    model.save_pth(model.load_npz(seed_path), tmp_path / "weights.npz")
    assert model.model_file_kind(tmp_path / "weights.npz") == "pth"
    with pytest.raises(ModelFileError, match="is a numpy .npz parameter file, expected a PyTorch .pth"):
        model.load_pth(renamed)


def test_pickles_inside_npz_or_pth_never_run(tmp_path):
    marker = tmp_path / "executed"
    with open(tmp_path / "objects.npz", "wb") as handle:
        arrays = {str(i): p for i, p in enumerate(model.get_parameters(model.Net()))}
        np.savez(handle, **{**arrays, "0": np.array([Evil(marker)], dtype=object)})
    with pytest.raises(ModelFileError, match=r"objects.npz: array 0 \(conv1.weight\) is object, expected plain"):
        model.load_model_file(tmp_path / "objects.npz")
    torch.save({"conv1.weight": Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ModelFileError, match="evil.pth: not a state_dict that loads with weights_only=True"):
        model.load_model_file(tmp_path / "evil.pth")
    assert not marker.exists()


def test_state_dict_names_and_types_are_checked(tmp_path):
    state = model.parameters_to_state_dict(model.get_parameters(model.Net()))
    torch.save({"model_state_dict": state, "epoch": 3}, tmp_path / "checkpoint.pth")
    with pytest.raises(ModelFileError, match=r"does not match the MNIST CNN; missing \['conv1.weight'"):
        model.load_pth(tmp_path / "checkpoint.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ModelFileError, match="expected a state_dict \\(a dict of tensors\\), got list"):
        model.load_pth(tmp_path / "list.pth")

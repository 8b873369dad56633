"""The shipped examples run as written: the data-platform module's scripts and the pipeline spec."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from mnist_edge import data, model

XDATA = REPO / "examples" / "xdata_module"
PIPELINE = REPO / "examples" / "pipeline"


@pytest.fixture(scope="module")
def table(tmp_path_factory, mnist5k) -> tuple[Path, Path]:
    """A labelled training table and a predict table without labels, from real MNIST images."""
    images, labels = mnist5k
    root = tmp_path_factory.mktemp("tables")
    order = np.random.default_rng(7).permutation(len(labels))
    train, predict = order[:150], order[150:200]
    data.write_shard(root / "train.csv", images[train], labels[train], train)
    data.write_shard(root / "predict.csv", images[predict], np.full(50, data.NO_LABEL), predict)
    return root / "train.csv", root / "predict.csv"


def run_script(script: Path, run_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a module script the way the platform does: cwd elsewhere, RUN_DIR and PYTHON set."""
    environment = {**os.environ, "RUN_DIR": str(run_dir), "PYTHON": sys.executable, **env}
    return subprocess.run([str(script)], cwd=run_dir.parent, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_xdata_module_trains_then_predicts_in_its_run_directory(tmp_path, table):
    train_csv, predict_csv = table
    run = tmp_path / "run"
    (run / "input" / "train_dataset").mkdir(parents=True)
    (run / "input" / "train_dataset" / "dataset.csv").write_bytes(train_csv.read_bytes())

    done = run_script(XDATA / "train.sh", run, EPOCHS="1")
    assert done.returncode == 0, done.stderr
    models = run / "output" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["mnist.pth", "mnist.xdata-meta.json"]
    meta = json.loads((models / "mnist.xdata-meta.json").read_text())
    assert meta["model_kind"] == "mnist" and meta["num_examples"] == 150 and meta["epochs"] == 1

    # The platform hands the trained model to the predict step as an input.
    (run / "input" / "models").mkdir()
    (run / "input" / "models" / "mnist.pth").write_bytes((models / "mnist.pth").read_bytes())
    (run / "input" / "predict_dataset").mkdir()
    (run / "input" / "predict_dataset" / "dataset.csv").write_bytes(predict_csv.read_bytes())
    done = run_script(XDATA / "predict.sh", run)
    assert done.returncode == 0, done.stderr
    with open(run / "output" / "predict_result" / "result.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 50 and list(rows[0]) == ["image_id", "label", "confidence"]


def test_xdata_definition_names_the_files_the_scripts_use():
    definition = json.loads((XDATA / "definitions" / "definition.json").read_text())
    for step in ("train", "predict"):
        script = (XDATA / definition[step]["command"]).read_text()
        for entry in definition[step]["inputs"] + definition[step]["outputs"]:
            assert entry["path"].endswith(".xdata-meta.json") or f"$RUN_DIR/{entry['path']}" in script
    assert definition["run_directory_variable"] == "RUN_DIR"


def run_pipeline(spec: Path, pfs: Path) -> subprocess.CompletedProcess:
    """Run the spec's command with ``/pfs`` moved to a temp directory and this venv's python."""
    command = json.loads(spec.read_text())["transform"]["cmd"]
    assert command[:3] == ["python3", "-m", "mnist_edge"]
    moved = [str(pfs) + arg[len("/pfs"):] if arg.startswith("/pfs/") else arg for arg in command[1:]]
    return subprocess.run([sys.executable, *moved], capture_output=True, text=True, timeout=300)


def test_pipeline_specs_read_pfs_repos_and_write_pfs_out(tmp_path, table):
    train_csv, predict_csv = table
    train_spec, predict_spec = PIPELINE / "mnist-train.json", PIPELINE / "mnist-predict.json"
    (tmp_path / "train" / "mnist-shards").mkdir(parents=True)
    (tmp_path / "train" / "mnist-shards" / "part-0.csv").write_bytes(train_csv.read_bytes())
    (tmp_path / "train" / "out").mkdir()
    done = run_pipeline(train_spec, tmp_path / "train")
    assert done.returncode == 0, done.stderr
    trained = tmp_path / "train" / "out" / "mnist.pth"
    model.state_dict_to_parameters(torch.load(trained, weights_only=True), str(trained))

    # The predict pipeline sees the train pipeline's output repo under its name.
    predict_pfs = tmp_path / "predict"
    (predict_pfs / "mnist-predict").mkdir(parents=True)
    (tmp_path / "train" / "out").rename(predict_pfs / "mnist-train")
    (predict_pfs / "mnist-predict" / "part-0.csv").write_bytes(predict_csv.read_bytes())
    (predict_pfs / "out").mkdir()
    done = run_pipeline(predict_spec, predict_pfs)
    assert done.returncode == 0, done.stderr
    assert (predict_pfs / "out" / "result.csv").read_text().count("\n") == 51
    inputs = json.loads(predict_spec.read_text())["input"]["cross"]
    assert {i["pfs"]["repo"] for i in inputs} == {"mnist-train", "mnist-predict"}

"""A hostile server's ``output``: predictions go only where nothing is, or where a prediction wrote.

Each case is an inference task through a real ``EdgeClient`` on a node whose data directory holds
what real nodes hold: shards in either layout, the operator's own files, the node's state (the
privacy ledger). A refused output fails the task naming it, writes nothing, and the node trains on.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from hostile import node, scaleout_model, seed_params, with_id
from mnist_edge import data, files, paths
from mnist_edge.errors import UserError
from mnist_edge.node import LEDGER_NAME, STATE_DIR


@pytest.fixture(scope="module")
def seed(seed_path):
    return scaleout_model(seed_params(seed_path))


@pytest.fixture
def single_file_node(tmp_path, mnist5k):
    """A node with the single-file layout (``train.csv``, ``test.csv``, ``predict.csv``), a ledger
    and an operator's file beside them."""
    images, labels = mnist5k
    root = tmp_path / "node"
    data.write_shard(root / "train.csv", images[:100], labels[:100])
    data.write_shard(root / "test.csv", images[100:150], labels[100:150])
    data.write_shard(root / "predict.csv", images[150:160], np.full(10, data.NO_LABEL))
    (root / "labels-master.csv").write_text("image_id,label\n1,7\n")
    (root / STATE_DIR).mkdir()
    (root / STATE_DIR / LEDGER_NAME).write_text('{"format": 1}\n')
    return node(root, workdir=tmp_path / "work")


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file (bytes), link (target) and directory under ``root``, except the client's model cache."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if name.startswith(".model_cache") or name.startswith(".scaleout"):
            continue
        found[name] = f"-> {os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir() else path.read_bytes()
    return found


RECORD_NAME = "predictions.json"  # RECORD_NAME: the node's record of the predictions it wrote
SPLIT_NAMES = ["train", "train.csv", "test", "test/x.csv", "predict", "predict/x.csv", "predict.csv",
               "TRAIN", "Test/x.csv", "PREDICT.CSV", "Train.csv", "./train/x.csv"]
HIDDEN = [f"{STATE_DIR}/{LEDGER_NAME}", f"{STATE_DIR}/{RECORD_NAME}", f"{STATE_DIR}/x.csv",
          "a/.hidden/x.csv", ".x.csv", "predictions/.m.csv.1.ab.partial", "x/../.mnist-edge/y.csv"]


@pytest.mark.parametrize("output", SPLIT_NAMES)
def test_no_output_takes_a_name_a_split_could_take(single_file_node, seed, output):
    """``train`` or ``test/x.csv`` beside ``train.csv``/``test.csv`` would shadow them for good: refused
    in any case, nothing written, and the next train and validate tasks work on the same shards."""
    before = snapshot(single_file_node.data_dir)
    with pytest.raises(paths.PathError, match="parameter 'output'"):
        single_file_node.run("predict", seed, {"output": output})
    assert snapshot(single_file_node.data_dir) == before
    _, metadata = single_file_node.run("train", seed, {"epochs": 1, "batch_size": 50})
    assert metadata["training_metadata"]["num_examples"] == 100
    assert single_file_node.run("validate", seed)["num_test_examples"] == 50


@pytest.mark.parametrize("output", HIDDEN)
def test_no_output_lands_under_a_hidden_name(single_file_node, seed, output):
    """The node's state directory holds the privacy ledger; no task writes there, or anywhere hidden."""
    before = snapshot(single_file_node.data_dir)
    with pytest.raises(paths.PathError, match="parameter 'output'"):
        single_file_node.run("predict", seed, {"output": output})
    assert snapshot(single_file_node.data_dir) == before


def test_the_operators_file_is_never_replaced(single_file_node, seed):
    before = snapshot(single_file_node.data_dir)
    with pytest.raises(files.TargetError, match="labels-master.csv: exists and no prediction of this node wrote it"):
        single_file_node.run("predict", seed, {"output": "labels-master.csv"})
    assert snapshot(single_file_node.data_dir) == before


def test_an_earlier_prediction_may_be_rewritten_until_someone_changes_it(single_file_node, seed):
    """How the node knows a file is its own: the record of written predictions and their sha256."""
    root = single_file_node.data_dir
    first = single_file_node.run("predict", seed, {"output": "results/p.csv"})
    target = root / "results" / "p.csv"
    assert first["output"] == str(target.resolve()) and first["count"] == 10
    from mnist_edge import outputs

    assert outputs.RECORD_NAME == RECORD_NAME
    record = json.loads((root / STATE_DIR / RECORD_NAME).read_text())
    assert record["outputs"] == {"results/p.csv": hashlib.sha256(target.read_bytes()).hexdigest()}
    single_file_node.run("predict", with_id(seed, "second"), {"output": "results/p.csv"})  # its own file: again
    default = single_file_node.run("predict", with_id(seed, "m1"), {})
    single_file_node.run("predict", with_id(seed, "m1"), {})  # the default output, twice
    assert default["output"] == str((root / "predictions" / "m1.csv").resolve())
    with open(target, "a") as handle:
        handle.write("99,1,0.5\n")  # now the operator's
    edited = target.read_bytes()
    with pytest.raises(files.TargetError, match="p.csv: changed since this node's prediction wrote it"):
        single_file_node.run("predict", seed, {"output": "results/p.csv"})
    assert target.read_bytes() == edited
    target.unlink()
    single_file_node.run("predict", seed, {"output": "results/p.csv"})


def test_an_unreadable_record_means_nothing_existing_is_replaced(single_file_node, seed):
    root = single_file_node.data_dir
    single_file_node.run("predict", seed, {"output": "p.csv"})
    (root / STATE_DIR / RECORD_NAME).write_text('{"format": 1, "outputs": {"p.csv": [')
    written = (root / "p.csv").read_bytes()
    with pytest.raises(files.TargetError, match="no prediction of this node wrote it"):
        single_file_node.run("predict", seed, {"output": "p.csv"})
    assert (root / "p.csv").read_bytes() == written


def test_a_link_on_the_way_is_refused_even_when_it_stays_inside(single_file_node, seed):
    """``alias -> predictions`` resolves inside the data directory, but outputs are walked without
    following links: a link there now could point anywhere by the time of the write."""
    root = single_file_node.data_dir
    (root / "predictions").mkdir()
    (root / "alias").symlink_to(root / "predictions")
    before = snapshot(root)
    with pytest.raises(files.TargetError, match="a name on the way is a symbolic link"):
        single_file_node.run("predict", seed, {"output": "alias/x.csv"})
    assert snapshot(root) == before


def test_a_file_that_appears_during_the_task_is_not_replaced(single_file_node, seed):
    """The name was free when checked; the operator's file created while the images were predicted
    (from the client's abort check, between the check and the write) survives: the prediction is
    linked into place, never renamed over a name that is taken by then."""
    root = single_file_node.data_dir
    client = single_file_node.client
    original = client.check_task_abort

    def operator_writes():
        (root / "late.csv").write_text("mine\n")
        client.check_task_abort = original

    client.check_task_abort = operator_writes
    with pytest.raises(files.TargetError, match="late.csv: exists and no prediction of this node wrote it"):
        single_file_node.run("predict", seed, {"output": "late.csv"})
    assert (root / "late.csv").read_text() == "mine\n"
    assert sorted(p.name for p in root.iterdir() if p.name.endswith(".partial")) == []


def test_a_file_that_appears_while_the_prediction_is_written_is_not_replaced(tmp_path):
    """The last window, after the final check: the name taken while the rows are written (here by
    the row writer itself) makes the write fail, not replace it; nothing partial is left."""
    target = tmp_path / "late.csv"

    def rows(handle):
        handle.write(b"image_id,label,confidence\n")
        target.write_text("mine\n")

    directory = files.open_directory(tmp_path)
    try:
        with pytest.raises(files.TargetError, match="late.csv: appeared while it was being written"):
            files.write_in(directory, target, rows, "wb", replace=False)
    finally:
        os.close(directory)
    assert target.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["late.csv"]


def _exchange(a: Path, b: Path) -> bool:
    """Swap two names atomically (``renameat2(RENAME_EXCHANGE)``); False if the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return libc.renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), rename_exchange) == 0


def test_a_directory_swapped_for_a_link_during_the_task_is_never_written_through(single_file_node, seed, tmp_path):
    """Another thread swaps ``predictions/`` for a link to a directory outside, back and forth, while
    predictions run: some tasks write, some are refused, none writes outside the data directory."""
    root = single_file_node.data_dir
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "predictions").mkdir()
    (root / "swap").symlink_to(outside)
    if not _exchange(root / "predictions", root / "swap") or not _exchange(root / "predictions", root / "swap"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    stop = threading.Event()

    def swapper():
        while not stop.is_set():
            _exchange(root / "predictions", root / "swap")

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    results = []
    try:
        for i in range(30):
            try:
                single_file_node.run("predict", with_id(seed, f"m{i}"), {})
                results.append("written")
            except UserError as error:
                results.append(str(error))
    finally:
        stop.set()
        thread.join(10)
    assert list(outside.iterdir()) == [], f"written through the link: {sorted(p.name for p in outside.iterdir())}"
    assert "written" in results, results[:3]  # the race ran both ways
    refused = [r for r in results if r != "written"]
    assert all("symbolic link" in r or "not a directory" in r for r in refused), refused[:3]

"""Faults with real ``scaleout client start`` processes against the loopback combiner.

A node killed with SIGKILL in the middle of a round (and of an inference task) is started again:
it registers again, takes the next round, and leaves no half-written prediction or cache file.
A full disk while predictions are written (a tiny tmpfs mounted over ``predictions/``) fails the
inference task naming the path and leaves nothing behind. A round that diverges, and an output
path outside the data directory, fail on the real client too, with nothing uploaded or written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from combiner import INFER, TRAIN, TestCombiner
from e2e_helpers import EdgeNode, Fleet, package_tarball, prepare_shards, unpack
from mnist_edge import data

pytestmark = pytest.mark.e2e

POLL = 1
READY_TIMEOUT = 180  # importing torch on two busy cores, twice over for a restart
TASK_TIMEOUT = 150
LONG_ROUND = {"epochs": 20, "batch_size": 16, "seed": 1}  # minutes of work: killed long before it ends
SHORT_ROUND = {"epochs": 1, "batch_size": 32, "seed": 2}


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory, seed_path: Path) -> Iterator[tuple[Fleet, str]]:
    root = tmp_path_factory.mktemp("faults")
    tarball = package_tarball(root / "dist")
    (data_dir,) = prepare_shards(root / "data", 1, 0.6)  # one node: 2,000 train, 3,000 test/predict images
    workdir = root / "node-0"
    unpack(tarball, workdir)
    fleet = Fleet(TestCombiner(), [EdgeNode("client-0", workdir, data_dir)])
    with fleet.running(POLL, seed_path, READY_TIMEOUT) as seed_id:
        yield fleet, seed_id


def restart_after_sigkill(fleet: Fleet, wait_for) -> None:
    """SIGKILL the client once ``wait_for()`` is true, start it again, and wait until it registered anew."""
    node, combiner = fleet.nodes[0], fleet.combiner
    combiner.wait_until(wait_for, TASK_TIMEOUT, "the task to be under way")
    registrations = len(combiner.registrations)
    combiner.health_check = None  # the death below is the point
    node.process.send_signal(signal.SIGKILL)
    assert node.process.wait(20) == -signal.SIGKILL
    node.start(combiner, POLL)
    combiner.health_check = fleet.check_alive
    combiner.wait_until(
        lambda: len(combiner.registrations) > registrations, READY_TIMEOUT, "the client to register again"
    )


def leftovers(*folders: Path) -> list[Path]:
    """Files a crash can leave half-written: temporary outputs, and cached models that are not whole zips."""
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.name.endswith((".partial", ".tmp")):
                found.append(path)
            elif path.suffix == ".scm" and not zipfile.is_zipfile(path):
                found.append(path)
    return found


def test_a_node_killed_mid_round_rejoins_and_the_next_round_completes(started):
    fleet, seed_id = started
    node, combiner = fleet.nodes[0], fleet.combiner
    killed = combiner.submit_task(node.name, TRAIN, seed_id, {"client_settings": LONG_ROUND}, round_id="r1")
    metrics_before = len(combiner.metrics)
    restart_after_sigkill(
        fleet, lambda: combiner.task(killed).status == "RUNNING" and len(combiner.metrics) > metrics_before
    )
    assert not combiner.task(killed).done  # the server learns of a killed task only from its own timeout
    uploads = len(combiner.uploads)

    task_id = combiner.submit_task(node.name, TRAIN, seed_id, {"client_settings": SHORT_ROUND}, round_id="r2")
    (task,) = combiner.wait_for_tasks([task_id], TASK_TIMEOUT)
    assert task.status == "COMPLETED", task.response
    assert len(combiner.uploads) == uploads + 1
    assert leftovers(node.data_dir, node.workdir) == []


def test_a_node_killed_mid_prediction_leaves_no_half_file(started):
    fleet, seed_id = started
    node, combiner = fleet.nodes[0], fleet.combiner
    big = node.data_dir / "predict" / "big.csv"  # 15,000 rows: seconds of inference on a busy CPU
    shard = data.read_shard(node.data_dir / "test" / "shard-000.csv")
    data.write_shard(big, shard.images.repeat(5, axis=0), shard.labels.repeat(5))
    output = node.data_dir / "predictions" / f"{seed_id}.csv"
    rows = 1 + 15_000 + 3_000
    try:
        killed = combiner.submit_task(node.name, INFER, seed_id, {"parameters": {}}, round_id="p1")
        restart_after_sigkill(fleet, lambda: combiner.task(killed).status == "RUNNING")
        assert not output.exists() or len(output.read_text().splitlines()) == rows  # never a part of it
        assert leftovers(node.data_dir) == []  # what the kill left, the restart removed
        task_id = combiner.submit_task(node.name, INFER, seed_id, {"parameters": {}}, round_id="p2")
        (task,) = combiner.wait_for_tasks([task_id], TASK_TIMEOUT)
        assert task.status == "COMPLETED", task.response
        lines = output.read_text().splitlines()
        assert lines[0] == "image_id,label,confidence" and len(lines) == rows
        assert leftovers(node.data_dir, node.workdir) == []
    finally:
        big.unlink(missing_ok=True)


def test_a_diverging_round_fails_on_the_node_and_uploads_nothing(started):
    fleet, seed_id = started
    node, combiner = fleet.nodes[0], fleet.combiner
    uploads = len(combiner.uploads)
    settings = {"optimizer": "sgd", "learning_rate": 1000, "batch_size": 32, "seed": 1}
    task_id = combiner.submit_task(node.name, TRAIN, seed_id, {"client_settings": settings}, round_id="r3")
    (task,) = combiner.wait_for_tasks([task_id], TASK_TIMEOUT)
    assert task.status == "FAILED" and task.response["error"].startswith("training diverged (loss nan at batch ")
    assert len(combiner.uploads) == uploads and not any(u.correlation_id == task_id for u in combiner.updates)


def test_an_output_outside_the_data_dir_fails_the_inference_task(started, tmp_path):
    fleet, seed_id = started
    node, combiner = fleet.nodes[0], fleet.combiner
    target = tmp_path / "stolen.csv"
    task_id = combiner.submit_task(node.name, INFER, seed_id, {"parameters": {"output": str(target)}}, round_id="p3")
    (task,) = combiner.wait_for_tasks([task_id], TASK_TIMEOUT)
    assert task.status == "FAILED" and "parameter 'output'" in task.response["error"]
    assert not target.exists()


@pytest.fixture
def full_predictions(started) -> Iterator[Path]:
    """``predictions/`` on a 64 KiB tmpfs that is nearly full (root only: it mounts a filesystem)."""
    fleet, _ = started
    folder = fleet.nodes[0].data_dir / "predictions"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the RLIMIT_FSIZE test in "
            "test_paths.py covers a refused write without root"
        )
    try:
        filler = folder / "filler"
        with open(filler, "wb") as handle:
            try:
                handle.write(bytes(60 * 1024))
            except OSError:
                pass
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_fails_the_inference_task_naming_the_path(started, full_predictions):
    fleet, seed_id = started
    node, combiner = fleet.nodes[0], fleet.combiner
    task_id = combiner.submit_task(node.name, INFER, seed_id, {"parameters": {}}, round_id="p4")
    (task,) = combiner.wait_for_tasks([task_id], TASK_TIMEOUT)
    output = full_predictions / f"{seed_id}.csv"
    assert task.status == "FAILED", task.response
    assert task.response["error"] == f"{output.resolve()}: cannot write (No space left on device); nothing was written"
    assert sorted(p.name for p in full_predictions.iterdir()) == ["filler"]
    assert os.statvfs(full_predictions).f_bavail * os.statvfs(full_predictions).f_frsize < 8 * 1024

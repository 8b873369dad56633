"""Paths a task gives stay inside the node's data directory; outputs appear whole or not at all.

An inference task's ``output`` and ``data`` and the model id come from the server. Each hostile
value is sent through a real ``EdgeClient`` (in-process runtime) and must fail the task naming
the parameter, with nothing written outside the data directory and no input shard touched.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hostile import node, scaleout_model, seed_params, with_id
from mnist_edge import data, edge, files, paths
from mnist_edge.errors import UserError
from mnist_edge.files import TargetError
from mnist_edge.paths import PathError


@pytest.fixture
def hostile_node(node_dir, mnist5k, tmp_path):
    images, labels = mnist5k
    data.write_shard(node_dir / "predict" / "p.csv", images[:20], np.full(20, data.NO_LABEL), np.arange(20))
    return node(node_dir, workdir=tmp_path)


@pytest.fixture(scope="module")
def seed(seed_path):
    """The seed as the server sends it (built once: every test here only reads it)."""
    return scaleout_model(seed_params(seed_path))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


OUTSIDE = [
    ("absolute", lambda tmp: str(tmp / "outside" / "x.csv")),
    ("dot-dot", lambda tmp: "../outside/x.csv"),
    ("dot-dot-deep", lambda tmp: "predictions/../../outside/x.csv"),
    ("symlink-out", lambda tmp: "link/x.csv"),
]


@pytest.mark.parametrize("case,value", OUTSIDE, ids=[c[0] for c in OUTSIDE])
def test_output_outside_the_data_dir_fails_naming_the_parameter(hostile_node, seed, tmp_path, case, value):
    (tmp_path / "outside").mkdir()
    (hostile_node.data_dir / "link").symlink_to(tmp_path / "outside")
    before = snapshot(hostile_node.data_dir)
    with pytest.raises(PathError, match="parameter 'output' .* is outside the node's data directory"):
        hostile_node.run("predict", seed, {"output": value(tmp_path)})
    assert list((tmp_path / "outside").iterdir()) == []
    assert snapshot(hostile_node.data_dir) == before


@pytest.mark.parametrize("target, message", [
    ("train/shard-000.csv", "starts with 'train', a name the node's train/test/predict splits use"),
    ("test/shard-000.csv", "starts with 'test', a name"), ("predict/p.csv", "starts with 'predict', a name"),
    ("train/new.csv", "starts with 'train', a name"),
    ("./predict/../train/shard-000.csv", "the name '..' is not allowed"),
])
def test_output_never_replaces_or_joins_an_input_split(hostile_node, seed, target, message):
    before = snapshot(hostile_node.data_dir)
    with pytest.raises(PathError, match=f"parameter 'output' .*{message}"):
        hostile_node.run("predict", seed, {"output": target})
    assert snapshot(hostile_node.data_dir) == before


@pytest.mark.parametrize("value,message", [
    (5, "parameter 'output' must be a non-empty path string, got int"),
    ("", "parameter 'output' must be a non-empty path string, got str"),
    ("a\x00b.csv", "parameter 'output' contains a NUL character"),
    ("/dev/full", "is outside the node's data directory"),
    ("predictions", "predictions: is a directory, expected a file path to write"),
])
def test_output_that_is_not_a_writable_file_path_fails_clearly(hostile_node, seed, value, message):
    (hostile_node.data_dir / "predictions").mkdir()
    with pytest.raises(UserError, match=message):
        hostile_node.run("predict", seed, {"output": value})


def test_output_that_is_a_fifo_is_refused_not_blocked_on(hostile_node, seed):
    os.mkfifo(hostile_node.data_dir / "out.csv")
    with pytest.raises(TargetError, match="out.csv: exists and is not a regular file"):
        hostile_node.run("predict", seed, {"output": "out.csv"})


@pytest.mark.parametrize("model_id", ["../../evil", "ABSOLUTE", "predictions/../../evil", ".hidden", "a/b"])
def test_a_model_id_cannot_steer_the_default_output(hostile_node, seed, tmp_path, model_id):
    model_id = str(tmp_path / "evil") if model_id == "ABSOLUTE" else model_id
    before = snapshot(tmp_path)
    with pytest.raises(edge.ModelIdError, match="model id .* is not one this node accepts"):
        hostile_node.run("predict", with_id(seed, model_id), {})
    assert snapshot(tmp_path) == before


def test_data_outside_the_data_dir_fails_naming_the_parameter(hostile_node, seed, tmp_path, mnist5k):
    images, labels = mnist5k
    data.write_shard(tmp_path / "elsewhere" / "s.csv", images[:5], labels[:5])
    for value in (str(tmp_path / "elsewhere"), "../elsewhere/s.csv", "/etc"):
        with pytest.raises(PathError, match="parameter 'data' .* is outside the node's data directory"):
            hostile_node.run("predict", seed, {"data": value})
    with pytest.raises(PathError, match="parameter 'data' must be a non-empty path string, got list"):
        hostile_node.run("predict", seed, {"data": ["predict"]})


def test_paths_inside_the_data_dir_work_and_are_relative_to_it(hostile_node, seed, mnist5k):
    images, labels = mnist5k
    data.write_shard(hostile_node.data_dir / "extra" / "e.csv", images[:7], labels[:7])
    summary = hostile_node.run("predict", with_id(seed, "model-1"),
                               {"data": "extra", "output": "results/e.csv"})
    out = (hostile_node.data_dir / "results" / "e.csv").resolve()
    assert summary["output"] == str(out) and summary["count"] == 7
    default = hostile_node.run("predict", with_id(seed, "model-1"), {})
    assert default["output"] == str((hostile_node.data_dir / "predictions" / "model-1.csv").resolve())


# -- atomic writes ----------------------------------------------------------------------------------


def test_a_failing_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old\n")

    def half(handle):
        handle.write("new,partial\n")
        raise RuntimeError("stopped mid-write")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, half)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_a_process_killed_mid_write_leaves_no_half_file_and_the_next_write_cleans_up(tmp_path):
    """SIGKILL while rows are being written: the target never holds part of them, and the dead
    writer's temporary file goes once it is old enough to be sure no live writer owns it."""
    target = tmp_path / "predictions" / "m.csv"
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mnist_edge import files
        def slow(handle):
            handle.write("image_id,label,confidence\\n" + "1,2,0.5\\n" * 1000)
            handle.flush()
            Path({str(ready)!r}).touch()
            time.sleep(60)
        files.atomic_write(Path({str(target)!r}), slow)
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(600):
            if ready.exists() or process.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
        assert ready.exists(), "the writer never got to the middle of its write"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        process.kill()
    assert not target.exists()
    leftovers = list(target.parent.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.endswith(files.PARTIAL_SUFFIX)  # hidden, never the target
    data.write_predictions(target, np.array([7]), np.array([3]), np.array([0.9]))
    assert len(list(target.parent.iterdir())) == 2  # too recent to be sure its writer is gone
    past = leftovers[0].stat().st_mtime - files.STALE_SECONDS - 1
    os.utime(leftovers[0], (past, past))
    data.write_predictions(target, np.array([7]), np.array([3]), np.array([0.9]))
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.csv"]
    with open(target, newline="") as handle:
        assert list(csv.reader(handle)) == [["image_id", "label", "confidence"], ["7", "3", "0.9"]]


def test_startup_removes_what_a_crash_left_in_predictions(node_dir, tmp_path, caplog):
    """A partial file nobody holds and older than a writer needs to lock it is removed at start."""
    stale = node_dir / "predictions" / ".m.csv.123.abc123.partial"
    stale.parent.mkdir()
    stale.write_text("image_id,label")
    past = stale.stat().st_mtime - files.STALE_SECONDS - 1
    os.utime(stale, (past, past))
    node(node_dir, workdir=tmp_path)
    assert not stale.exists()


@pytest.mark.skipif(not hasattr(__import__("resource"), "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_write_the_system_refuses_fails_naming_the_path_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG) in a child process: a real I/O error."""
    target = tmp_path / "out" / "p.csv"
    script = textwrap.dedent(f"""
        import resource, signal
        import numpy as np
        from pathlib import Path
        from mnist_edge import data
        from mnist_edge.files import OutputError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            data.write_predictions(Path({str(target)!r}), np.arange(5000), np.zeros(5000, int), np.ones(5000))
        except OutputError as error:
            print("ERROR", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ERROR {target}: cannot write (File too large); nothing was written")
    assert list(target.parent.iterdir()) == []




def test_a_path_through_a_link_loop_is_refused_naming_it_not_a_bare_oserror(tmp_path):
    """A path whose links loop cannot be resolved, so it cannot be shown to stay out of the inputs:
    refused with a PathError naming it (a UserError the task reports), never an OSError from deep inside."""
    (tmp_path / "train").mkdir()
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(PathError, match=r"a/x\.csv cannot be resolved .*loops or changed while it was checked"):
        paths.refuse_inputs(tmp_path / "a" / "x.csv", [tmp_path / "train"], "parameter 'output'")

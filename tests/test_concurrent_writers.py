"""Temporary files belong to their writer: concurrent writers of one output never break each other.

Four real processes write the same output at once (predictions, the seed model); a client that
starts on a data directory while another process is in the middle of a prediction leaves that
prediction's temporary file alone, however old it looks.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mnist_edge import files, model
from test_edge import start

WRITERS = 4
WRITES = 25

PREDICTIONS = """
import sys
import numpy as np
from pathlib import Path
from mnist_edge import data
target, writer = Path(sys.argv[1]), int(sys.argv[2])
Path(sys.argv[3]).touch()
while not Path(sys.argv[4]).exists():  # all start together
    pass
failures = 0
for i in range(int(sys.argv[5])):
    ids = np.arange(2000) + writer * 10_000
    try:
        data.write_predictions(target, ids, np.full(2000, writer), np.full(2000, i / 100))
    except Exception as error:
        failures += 1
        print("FAILED", error, flush=True)
print("DONE", failures, flush=True)
"""

SEEDS = """
import sys
from pathlib import Path
from mnist_edge import model
target = Path(sys.argv[1])
Path(sys.argv[3]).touch()
while not Path(sys.argv[4]).exists():
    pass
failures = 0
params = model.get_parameters(model.new_model(0))
for i in range(int(sys.argv[5])):
    try:
        model.save_npz(params, target)
    except Exception as error:
        failures += 1
        print("FAILED", error, flush=True)
print("DONE", failures, flush=True)
"""


def run_together(script: str, target: Path, tmp_path: Path, writes: int) -> list[str]:
    """``WRITERS`` processes run ``script`` on one target, released at the same instant."""
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{w}" for w in range(WRITERS)]
    processes = [subprocess.Popen([sys.executable, "-c", script, str(target), str(w), str(ready[w]), str(go),
                                   str(writes)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}) for w in range(WRITERS)]
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in ready):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=600) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err for _, err in outputs]
    return [out for out, _ in outputs]


def test_four_processes_writing_one_prediction_file_lose_nothing(tmp_path):
    target = tmp_path / "predictions" / "m.csv"
    target.parent.mkdir()
    outputs = run_together(PREDICTIONS, target, tmp_path, WRITES)
    assert all(out.strip().endswith("DONE 0") and "FAILED" not in out for out in outputs), outputs
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.csv"]  # no temporary file left
    with open(target, newline="") as handle:
        rows = list(csv.DictReader(handle))
    writers = {int(r["label"]) for r in rows}
    assert len(rows) == 2000 and len(writers) == 1  # one writer's whole file, never a mix
    writer = writers.pop()
    assert [int(r["image_id"]) for r in rows] == list(range(writer * 10_000, writer * 10_000 + 2000))


def test_four_seed_builds_into_one_path_all_succeed(tmp_path):
    target = tmp_path / "seed.npz"
    outputs = run_together(SEEDS, target, tmp_path, 10)
    assert all(out.strip().endswith("DONE 0") for out in outputs), outputs
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != "") == ["seed.npz"]
    assert not list(tmp_path.glob(f"*{files.PARTIAL_SUFFIX}"))
    loaded = model.load_npz(target)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, model.get_parameters(model.new_model(0)), strict=True))


SLOW_PREDICTION = """
import sys, time
import numpy as np
from pathlib import Path
from mnist_edge import data
target, ready, release = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
real = data.atomic_write
def slow(path, write, *args, **kwargs):
    def stalled(handle):
        write(handle)
        handle.flush()
        ready.touch()
        while not release.exists():
            time.sleep(0.05)
    return real(path, stalled, *args, **kwargs)
data.atomic_write = slow
data.write_predictions(target, np.arange(10), np.arange(10) % 10, np.full(10, 0.5))
print("WRITTEN", flush=True)
"""


def test_a_client_starting_on_the_data_dir_leaves_a_live_writers_partial_alone(tmp_path, monkeypatch, node_dir):
    """Another process is writing predictions/m.csv (its temporary file even looks old): a second
    client starting on the same data directory must not remove it, and the write completes."""
    target = node_dir / "predictions" / "m.csv"
    target.parent.mkdir()
    ready, release = tmp_path / "ready", tmp_path / "release"
    writer = subprocess.Popen([sys.executable, "-c", SLOW_PREDICTION, str(target), str(ready), str(release)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < deadline, writer.stderr.read()
            time.sleep(0.05)
        [partial] = target.parent.glob(f".m.csv.*{files.PARTIAL_SUFFIX}")
        old = time.time() - files.STALE_SECONDS - 60
        os.utime(partial, (old, old))
        start(tmp_path, monkeypatch, node_dir)  # edge.register clears what crashed writers left
        assert partial.exists()
        release.touch()
        out, err = writer.communicate(timeout=60)
    finally:
        release.touch()
        writer.kill()
    assert writer.returncode == 0 and "WRITTEN" in out, err
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.csv"]
    with open(target, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 10

"""Data-parallel training on torch's own engine, as Kubeflow runs it: the manifests' own commands.

Real processes on loopback, one torch thread each: ``torchrun --standalone --nproc-per-node 2``
(and the Kubeflow Trainer's ``PET_*`` variables), and two plain processes with the Training
Operator v1's ``MASTER_ADDR``/``RANK``/``WORLD_SIZE``. Inputs and outputs go through the real S3
server of tests/s3_server.py where the manifests name buckets.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import kubeflow_manifests
from conftest import VENV_BIN
from mnist_edge import data, model, training
from mnist_edge.distributed import hash_ids, weights_sha256
from s3_server import child_env

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    clean = {k: v for k, v in child_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                   "MASTER_PORT") and not k.startswith("PET_")}
    return {**clean, "OMP_NUM_THREADS": "1", "MNIST_EDGE_DIST_TIMEOUT": "30", **(extra or {})}


def torchrun(*args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    command = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--module", "mnist_edge", *args]
    return subprocess.run(command, cwd=cwd, env=env(extra), capture_output=True, text=True, timeout=600)


def ranks(*args: str, cwd: Path, per_rank: list[list[str]] | None = None, **extra: str) -> list[subprocess.Popen]:
    """Two ``python -m mnist_edge`` processes with the v1 operator's variables (no torchrun)."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "mnist_edge", *args, *(per_rank[rank] if per_rank else [])],
                             cwd=cwd, env=env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
                                               "WORLD_SIZE": "2", **extra}),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=600) for p in processes]
    return [(p.returncode, *out) for p, out in zip(processes, outputs)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, mnist5k) -> tuple[Path, Path]:
    """Two train shards (1,600 + 1,400 real images) and a held-out test shard of 1,000."""
    images, labels = mnist5k
    root = tmp_path_factory.mktemp("shards")
    order = np.random.default_rng(11).permutation(len(labels))
    data.write_shard(root / "train" / "a.csv", images[order[:1600]], labels[order[:1600]], order[:1600])
    data.write_shard(root / "train" / "b.csv", images[order[1600:3000]], labels[order[1600:3000]], order[1600:3000])
    data.write_shard(root / "test" / "t.csv", images[order[4000:]], labels[order[4000:]], order[4000:])
    return root / "train", root / "test"


def ids_of(path: Path) -> np.ndarray:
    return data.load_files([path], path.parent).image_ids


@pytest.mark.parametrize("layout", ["two shards", "one shard"])
def test_each_rank_trains_on_its_own_part_and_the_ranks_end_with_the_same_weights(shards, tmp_path, layout):
    """Under torchrun the ranks' rows are disjoint and together the whole input (whole files when
    every rank can have one, else every other row); DDP leaves both with the same weights, which
    rank 0 alone writes, with the dataset's own fingerprint."""
    train, _ = shards
    dataset = train if layout == "two shards" else train / "a.csv"
    done = torchrun("train", "--epochs", "1", "--seed", "3", "--model", str(tmp_path / "m.pth"), str(dataset),
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / "m.xdata-meta.json").read_text())
    job = meta["distributed"]
    if layout == "two shards":
        expected = [ids_of(train / "a.csv"), ids_of(train / "b.csv")]
        assert [r["files"] for r in job["ranks"]] == [["a.csv"], ["b.csv"]]
    else:
        whole = ids_of(train / "a.csv")
        expected = [whole[0::2], whole[1::2]]
    assert [r["image_ids_sha256"] for r in job["ranks"]] == [hash_ids(ids) for ids in expected]
    assert not set(expected[0]) & set(expected[1])
    everything = np.concatenate([ids_of(p) for p in data.shard_files(dataset)])
    assert sorted(np.concatenate(expected)) == sorted(everything)
    assert meta["num_examples"] == len(everything) and meta["batch_size"] == 64
    assert meta["data_fingerprint"] == data.load_dataset(dataset).fingerprint  # as one process would say
    said = [line for line in done.stdout.splitlines() if "weights sha256" in line]
    assert len(said) == 2 and len({line.rsplit(" ", 1)[1] for line in said}) == 1
    written = model.Net()
    model.set_parameters(written, model.load_pth(tmp_path / "m.pth"))
    assert said[0].rsplit(" ", 1)[1] == job["weights_sha256"] == weights_sha256(written)
    assert done.stdout.count("wrote ") == 1 and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.pth", "m.xdata-meta.json"]


def test_two_ranks_reach_the_accuracy_of_one_process_on_the_same_images_and_epochs(shards, tmp_path):
    """The job's batch is the batch asked for (half on each rank), so two ranks learn as one process."""
    train, test = shards
    held_out = data.load_dataset(test)
    accuracies = []
    for name, run in (("one", lambda out: subprocess.run(
            [sys.executable, "-m", "mnist_edge", "train", "--epochs", "3", "--seed", "5", "--model", out, str(train)],
            cwd=tmp_path, env=env({"OMP_NUM_THREADS": "2"}), capture_output=True, text=True, timeout=900)),
                      ("two", lambda out: torchrun("train", "--epochs", "3", "--seed", "5", "--model", out, str(train),
                                                   cwd=tmp_path))):
        done = run(str(tmp_path / f"{name}.pth"))
        assert done.returncode == 0, done.stderr[-3000:]
        net = model.Net()
        model.set_parameters(net, model.load_pth(tmp_path / f"{name}.pth"))
        accuracies.append(training.evaluate(net, held_out.images, held_out.labels)[1])
    assert accuracies[0] > 0.9 and abs(accuracies[0] - accuracies[1]) <= 0.01, accuracies


def test_only_rank_0_writes(shards, tmp_path):
    """With the v1 operator's variables and no torchrun: rank 1 is given an output of its own and
    never creates it, nor anything else."""
    train, _ = shards
    (tmp_path / "rank1").mkdir()
    before = set((tmp_path / "rank1").iterdir())
    results = finish(ranks("train", "--epochs", "1", str(train), cwd=tmp_path,
                           per_rank=[["--model", str(tmp_path / "zero.pth")],
                                     ["--model", str(tmp_path / "rank1" / "out" / "one.pth")]]))
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert (tmp_path / "zero.pth").exists() and set((tmp_path / "rank1").iterdir()) == before


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_lost_rank_fails_the_job_with_a_clear_error_and_nothing_written(shards, tmp_path, stop):
    """A rank that dies, or stops answering, ends the other within the process group's timeout
    (here 10 s): one line naming the rank and what it was doing, exit 2, no model."""
    train, _ = shards
    zero, one = ranks("train", "--epochs", "20", "--model", str(tmp_path / "m.pth"), str(train), cwd=tmp_path,
                      MNIST_EDGE_DIST_TIMEOUT="10")
    try:
        seen = ""
        while "train (rank 0): 10 %" not in seen and zero.poll() is None:
            seen += zero.stderr.readline()
        one.send_signal(stop)
        start = time.monotonic()
        out, err = zero.communicate(timeout=300)
    finally:
        for process in (zero, one):
            process.kill()
            process.wait()
    assert zero.returncode == 2 and time.monotonic() - start < 240  # 10 s, and a busy machine
    assert "error: rank 0 of 2: lost the other ranks while training" in err
    assert "the job stops and writes nothing" in err
    assert "Traceback" not in err and not (tmp_path / "m.pth").exists()


def test_a_privacy_budget_is_refused_in_a_data_parallel_job(shards, tmp_path):
    train, _ = shards
    done = torchrun("train", "--model", str(tmp_path / "m.pth"), str(train), cwd=tmp_path, MNIST_EDGE_DP_EPSILON="3")
    assert done.returncode != 0 and "DP-SGD runs in one process" in done.stderr
    assert not (tmp_path / "m.pth").exists()


# -- the manifests' own commands, against the real S3 server -------------------------------------------


@pytest.fixture(scope="module")
def store(s3_server, shards):
    """The buckets the manifests name, with the train shards in ``master.mnist-shards``."""
    train, _ = shards
    client = s3_server.client()
    for bucket in ("master.mnist-shards", "master.mnist-models"):
        client.create_bucket(Bucket=bucket)
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for shard in sorted(train.glob("*.csv")):
        client.put_object(Bucket="master.mnist-shards", Key=shard.name, Body=shard.read_bytes())
    return s3_server


def the_trained_models(store) -> list[dict]:
    client = store.client()
    versions = client.list_object_versions(Bucket="master.mnist-models", Prefix="mnist.xdata-meta.json")["Versions"]
    return [json.loads(client.get_object(Bucket="master.mnist-models", Key=v["Key"], VersionId=v["VersionId"])
                       ["Body"].read()) for v in versions]


def test_the_trainjob_command_runs_under_torchrun_with_the_trainers_variables(store, tmp_path, shards):
    """Trainer v2 injects only PET_*: torchrun reads them, and the job reads and writes the buckets."""
    command = kubeflow_manifests.trainjob_command()
    assert command[0] == "torchrun"
    pet = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1",
           "PET_MASTER_PORT": str(free_port())}
    done = subprocess.run([str(VENV_BIN / "torchrun"), *command[1:]], cwd=tmp_path,
                          env=env({**store.environ(), **pet}), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "uploaded s3://master.mnist-models/mnist.pth (version" in done.stdout
    meta = the_trained_models(store)[0]
    assert meta["distributed"]["world_size"] == 2
    assert sorted(i["key"] for i in meta["lineage"]["inputs"]) == ["a.csv", "b.csv"]
    assert all(i["version_id"] for i in meta["lineage"]["inputs"])
    assert meta["data_fingerprint"] == data.load_dataset(shards[0]).fingerprint


def test_the_pytorchjob_command_runs_with_the_operators_variables(store, tmp_path, shards):
    """Training Operator v1 starts ``nprocPerNode`` processes per replica with MASTER_ADDR, RANK and
    WORLD_SIZE: the manifest's command, one process per replica, here two replicas on loopback."""
    command = kubeflow_manifests.pytorchjob_command()
    assert command[:3] == ["python", "-m", "mnist_edge"]
    results = finish(ranks(*command[3:], cwd=tmp_path, **store.environ()))
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:]
    assert "uploaded s3://master.mnist-models/mnist.pth (version" in results[0][1]
    assert "uploaded" not in results[1][1]
    meta = the_trained_models(store)[0]  # the newest version
    assert meta["distributed"]["world_size"] == 2 and meta["lineage"]["store"] == store.endpoint
    assert meta["data_fingerprint"] == data.load_dataset(shards[0]).fingerprint

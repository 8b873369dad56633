"""Shared fixtures: real MNIST images (the offline 5k subset) written as real shard files."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from scaleoututil.helpers.helpers import get_helper

import built_seed
import real_images
from mnist_edge import data

REPO = Path(__file__).resolve().parents[1]
CLIENT_DIR = REPO / "client"
VENV_BIN = Path(sys.executable).parent
# The scaleout client line under test: "1.0.7" (.venv) or "1.1" (.venv-1.1), as the Makefile's LINE.
CLIENT_LINE = "1.1" if tuple(int(p) for p in version("scaleout").split(".")[:2]) >= (1, 1) else "1.0.7"
# Where EdgeClient stages models, relative to its working directory.
MODEL_CACHE = ".scaleout/model_cache" if CLIENT_LINE == "1.1" else ".model_cache"
# The numpyhelper, as a server builds the ScaleoutModels it sends.
NUMPY_HELPER = get_helper("numpyhelper")
# Lines a test wants in the run's closing summary (measurements such as the e2e accuracies).
SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    for line in SUMMARY:
        terminalreporter.write_line(f"[scaleout {version('scaleout')}] {line}")


@pytest.fixture(scope="session")
def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28), labels int64) — 500 real MNIST images per digit."""
    return real_images.mnist5k()


@pytest.fixture(autouse=True)
def _fresh_shard_cache():
    """Each test starts cold so cache behaviour never leaks between tests."""
    data.clear_cache()
    yield
    data.clear_cache()


@pytest.fixture(scope="session")
def seed_path() -> Path:
    """The seed model made by the real ``scaleout run build -p client`` (once per process: built_seed.py)."""
    return built_seed.seed_npz(CLIENT_DIR, VENV_BIN / "scaleout")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (moto) on 127.0.0.1 with enforced credentials: tests/s3_server.py."""
    from s3_server import S3Server

    server = S3Server.start(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


def make_node(root: Path, images: np.ndarray, labels: np.ndarray, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A node's data directory with ``train/`` and ``test/`` shards drawn from real images."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    train, test = order[:n_train], order[n_train : n_train + n_test]
    data.write_shard(root / "train" / "shard-000.csv", images[train], labels[train], train)
    data.write_shard(root / "test" / "shard-000.csv", images[test], labels[test], test)
    return root


@pytest.fixture
def node_dir(tmp_path, mnist5k) -> Path:
    """A small node: 1,000 train and 300 test real MNIST images."""
    images, labels = mnist5k
    return make_node(tmp_path / "node", images, labels, 1000, 300)


def shards_fingerprint(files: list[Path]) -> str:
    """``data_fingerprint`` computed from the files on disk, independently of mnist_edge: the sha256
    of the shards' sha256 hex digests, in the order the split lists them (by name)."""
    digests = "".join(hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in sorted(files))
    return hashlib.sha256(digests.encode("ascii")).hexdigest()


def frozen_times(monkeypatch, path: Path) -> None:
    """From now on every stat of ``path`` shows the timestamps it shows now, as a filesystem with a coarse
    clock (FAT's 2 s, some network filesystems) shows a rewrite within one tick: same inode, same size,
    same times. No local filesystem can be made to do that for real (Linux gives a file changed after a
    stat a fine-grained ctime), so ``os.stat`` reports it; the inode and the size stay the real ones."""
    first = os.stat(path)
    real_stat = os.stat

    def stat(target, *args, **kwargs):
        status = real_stat(target, *args, **kwargs)
        if os.fspath(target) != os.fspath(path):
            return status
        times = {f"st_{kind}time_ns": getattr(first, f"st_{kind}time_ns") for kind in ("a", "m", "c")}
        return os.stat_result([*status[:7], *first[7:10]], times)

    monkeypatch.setattr(os, "stat", stat)


def auto_precision_here() -> str:
    """What ``precision: auto`` must resolve to on this machine's CPU, read from /proc/cpuinfo:
    bf16 where the CPU lists a native bf16 unit and torch's oneDNN has bf16 kernels, else fp32."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    if not flags:
        pytest.skip("/proc/cpuinfo lists no CPU flags")
    native = bool(flags & {"avx512_bf16", "amx_bf16", "bf16", "svebf16"})
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bf16" if native and onednn else "fp32"


__all__ = [
    "shards_fingerprint",
    "frozen_times",
    "auto_precision_here",
    "make_node",
    "REPO",
    "CLIENT_DIR",
    "VENV_BIN",
    "CLIENT_LINE",
    "MODEL_CACHE",
    "shutil",
]

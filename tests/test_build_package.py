"""The real scaleout CLI: `run build` writes a byte-stable seed; `package create` ships code only."""

from __future__ import annotations

import os
import subprocess
import tarfile

import numpy as np
from scaleoututil.helpers.helpers import get_helper

from conftest import CLIENT_DIR, CLIENT_LINE, REPO, VENV_BIN
from mnist_edge import model


def scaleout(*args: str, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "scaleout"), *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=180)


def test_two_builds_write_byte_identical_seeds(tmp_path, seed_path):
    again = tmp_path / "again"
    result = scaleout("run", "build", "-p", str(CLIENT_DIR), cwd=tmp_path,
                      env={"SCALEOUT_BUILD_OUTPUT_DIR": str(again)})
    assert result.returncode == 0, result.stderr
    assert f"wrote seed model {again / 'seed.npz'} (8 arrays, 1,199,882 parameters)" in result.stdout
    assert (again / "seed.npz").read_bytes() == seed_path.read_bytes()
    params = get_helper("numpyhelper").load(str(seed_path))
    assert [p.shape for p in params] == list(model.expected_shapes().values())
    assert all(p.dtype == np.float32 for p in params)


def test_build_defaults_to_the_working_directory_and_runs_in_this_venv(tmp_path):
    result = scaleout("run", "build", "-p", str(CLIENT_DIR), cwd=tmp_path, env={"SCALEOUT_BUILD_OUTPUT_DIR": ""})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "seed.npz").is_file()
    # scaleout 1.1 builds a managed venv (GBs) unless this one carries the env_metadata.txt that
    # `scaleout run install -p client` (make venv) wrote for python_env.yaml.
    assert not (tmp_path / ".scaleout" / "venvs").exists()
    assert "Creating a new environment" not in result.stdout + result.stderr


def test_make_seed_fails_when_no_seed_is_written(tmp_path):
    """scaleout exits 0 when build() raises (both lines); the Makefile target must not."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("build() cannot create a directory here")
    result = subprocess.run(["make", "-s", "seed", f"SEED_DIR={not_a_dir}", f"LINE={CLIENT_LINE}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"build did not write {not_a_dir}/seed.npz" in result.stdout + result.stderr


def test_package_holds_code_and_no_data_caches_venvs_seeds_or_tests(tmp_path):
    client = tmp_path / "client"
    subprocess.run(["cp", "-r", str(CLIENT_DIR), str(client)], check=True)
    junk = ["data/train/shard.csv", "predictions/x.csv", "seed.npz", "model.pth", ".model_cache/m.scm",
            ".scaleout/model_cache/m.scm", ".scaleout/venvs/mnist-edge-0a1b/bin/python",
            "mnist_edge/__pycache__/model.cpython-311.pyc", ".venv/bin/python", ".venv-1.1/bin/python",
            "tests/test_x.py", "old.tgz"]
    for name in junk:
        (client / name).parent.mkdir(parents=True, exist_ok=True)
        (client / name).write_text("x")
    result = scaleout("package", "create", "--path", str(client), "--output", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    with tarfile.open(tmp_path / "package.tgz") as tar:
        names = set(tar.getnames())
    for required in ["scaleout.yaml", "python_env.yaml", "build.py", "startup.py", "mnist_edge/__init__.py",
                     "mnist_edge/model.py", "mnist_edge/data.py", "mnist_edge/edge.py", "mnist_edge/training.py",
                     "mnist_edge/settings.py", "mnist_edge/paths.py", "mnist_edge/npz.py",
                     "mnist_edge/shards/__init__.py", "mnist_edge/shards/reader.py"]:
        assert required in names
    leaked = [n for n in names if any(part in n for part in ("data/", "predictions", ".npz", ".pth", "model_cache",
                                                               ".scaleout/", "__pycache__", ".venv", "tests", ".tgz",
                                                               "egg-info"))]
    assert leaked == []

"""Real ``scaleout client start`` processes for the end-to-end tests, and what they need.

Each node gets its own working directory holding the compute package exactly as
``scaleout package create`` ships it, its own ``SCALEOUT_DATA_DIR`` and its own ``TMPDIR`` and
``SCALEOUT_HOME_DIR``, so a run leaves nothing outside pytest's temp directories.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from combiner import HELPER, TestCombiner
from conftest import CLIENT_DIR, CLIENT_LINE, REPO, VENV_BIN

SCALEOUT = VENV_BIN / "scaleout"
COMMAND_TIMEOUT = 120  # seconds for one package / prepare command
STOP_TIMEOUT = 20  # seconds a client gets to exit after SIGTERM


def run(args: Sequence[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command to completion; fail with its output if it fails or runs too long."""
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {result.returncode}:\n{output[-3000:]}")
    return output


def quiet_env(workdir: Path, **overrides: str | Path) -> dict[str, str]:
    """This environment minus the shell's SCALEOUT_* settings, with home and temp in ``workdir``.

    One thread per process: three clients share two cores, and oversubscribed torch threads
    make every batch slower.
    """
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEOUT_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               SCALEOUT_HOME_DIR=str(workdir), TMPDIR=str(tmp))
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def package_tarball(out_dir: Path, package_dir: Path = CLIENT_DIR) -> Path:
    """``scaleout package create --path client``: the package as users upload it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run([SCALEOUT, "package", "create", "--path", package_dir, "--output", out_dir],
        cwd=out_dir, env=quiet_env(out_dir))
    return out_dir / "package.tgz"


def dispatcher_tarball(out_dir: Path) -> Path:
    """What ``make package-dispatcher`` builds: ``dispatcher/assemble.py``, then package create."""
    assembled = out_dir / "dispatcher"
    out_dir.mkdir(parents=True, exist_ok=True)
    run([sys.executable, REPO / "dispatcher" / "assemble.py", assembled], cwd=out_dir)
    return package_tarball(out_dir, assembled)


def satisfied_env(package_dir: Path) -> Path:
    """The dispatcher's managed environment for ``package_dir``, made from this one, offline.

    The dispatcher builds a venv from python_env.yaml where the installed line looks for it
    (1.0.7: ``<package>/<name>``, reused if it exists; 1.1: ``<package>/.scaleout/venvs/
    <name>-<sha>``, reused if its env_metadata.txt matches) and runs every command in it. This
    one is a real venv whose only addition is this venv's site-packages as a plain path: its
    ``.pth`` files (the editable ``mnist_edge``) are not run, so the commands import the library
    the package ships.
    """
    from scaleoututil.utils.environment import PythonEnv

    python_env = PythonEnv.from_yaml(package_dir / "python_env.yaml")
    if CLIENT_LINE == "1.1":
        from scaleoututil.config import SCALEOUT_VENV_DIR  # 1.1 only

        python_env.set_base_path(package_dir / SCALEOUT_VENV_DIR)
    else:
        python_env.set_base_path(package_dir)
    venv = python_env.path
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=package_dir)
    [site_packages] = (venv / "lib").glob("python3.*/site-packages")
    (site_packages / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    if CLIENT_LINE == "1.1":
        python_env._write_metadata(venv)  # what creating it writes last; the dispatcher checks it
    return venv


def unpack(tarball: Path, workdir: Path) -> Path:
    """Extract the package into ``workdir/client``, where ``scaleout client start`` looks for it."""
    target = workdir / "client"
    with tarfile.open(tarball) as archive:
        archive.extractall(target, filter="data")
    return target


def prepare_shards(out: Path, clients: int, test_fraction: float) -> list[Path]:
    """``python -m mnist_edge prepare`` (offline mnist5k); each client's test shards double as predict/."""
    run([sys.executable, "-m", "mnist_edge", "prepare", "--source", "mnist5k", "--clients", clients,
         "--out", out, "--seed", "0", "--test-fraction", test_fraction],
        cwd=out.parent, env=quiet_env(out.parent))
    data_dirs = [out / f"client-{i}" for i in range(clients)]
    for data_dir in data_dirs:
        (data_dir / "predict").mkdir()
        for shard in sorted((data_dir / "test").glob("*.csv")):
            shutil.copy(shard, data_dir / "predict" / shard.name)
    return data_dirs


def load_npz_params(path: Path) -> list[np.ndarray]:
    """A numpyhelper ``.npz`` (the seed) as the parameter list the combiner serves."""
    with open(path, "rb") as handle:
        return HELPER.load(handle)


def fedavg(
    combiner: TestCombiner, model_update_ids: Sequence[str], num_examples: Sequence[int]
) -> list[np.ndarray]:
    """FedAvg: the example-weighted mean of the uploaded models (numpyhelper's running mean)."""
    average: list[np.ndarray] | None = None
    total = 0
    for model_id, n in zip(model_update_ids, num_examples, strict=True):
        params = combiner.get_params(model_id)
        total += n
        average = params if average is None else HELPER.increment_average(average, params, n, total)
    assert average is not None, "no updates to aggregate"
    return average


@dataclass
class EdgeNode:
    """One ``scaleout client start`` process; its client id is its name."""

    name: str
    workdir: Path
    data_dir: Path
    process: subprocess.Popen | None = field(default=None, repr=False)
    env: dict[str, str] = field(default_factory=dict)  # extra environment, e.g. the node's DP budget
    dispatcher: bool = False  # ``--dispatcher``: the package's commands in subprocesses

    @property
    def log_path(self) -> Path:
        return self.workdir / "client.log"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self, combiner: TestCombiner, polling_interval: int) -> None:
        env = quiet_env(
            self.workdir,
            SCALEOUT_GRPC_SECURE="false",
            SCALEOUT_CLIENT_TASK_POLLING_INTERVAL=polling_interval,
            SCALEOUT_DATA_DIR=self.data_dir,
            **self.env,
        )
        # --disable-managed-env: run in this venv. scaleout 1.1 would otherwise build one from
        # python_env.yaml in ./.scaleout/venvs (GBs) and restart itself in it; 1.0.7 does that
        # only for --remote-package, and takes the flag as well.
        # The dispatcher ignores the flag: it always runs its commands in python_env.yaml's venv.
        args = [SCALEOUT, "client", "start", "--api-url", combiner.api_url, "--client-id", self.name,
                "--name", self.name, "--dispatcher" if self.dispatcher else "--disable-managed-env"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 (fixed argv, no shell)
                [str(a) for a in args], cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so teardown can reap anything it spawned
            )

    def check_alive(self) -> None:
        """The client exits 0 even when it fails, so any exit while it should serve is a failure."""
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with status {self.process.returncode}; log tail:\n{self.log_tail()}"
            )

    def sigterm(self) -> None:
        """What a supervisor sends: SIGTERM to the client's pid (not its group)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait_exit(self) -> int:
        """The exit status, once the client has exited (bounded by STOP_TIMEOUT)."""
        assert self.process is not None
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {STOP_TIMEOUT} s; log tail:\n{self.log_tail()}"
            ) from None

    def kill(self) -> None:
        """Teardown: whatever is left of this client's process group, gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(STOP_TIMEOUT)


@dataclass
class Fleet:
    """The combiner and its edge nodes, started and stopped together."""

    combiner: TestCombiner
    nodes: list[EdgeNode]

    @property
    def ids(self) -> list[str]:
        return [node.name for node in self.nodes]

    def check_alive(self) -> None:
        for node in self.nodes:
            node.check_alive()

    def start(self, polling_interval: int) -> None:
        """Start the combiner and launch the clients; they need seconds to import torch."""
        self.combiner.health_check = self.check_alive
        self.combiner.start()
        for node in self.nodes:
            node.start(self.combiner, polling_interval)

    def wait_ready(self, timeout: float) -> None:
        """Every client has polled once: registered, version-checked, startup() done."""
        self.combiner.wait_for_clients(self.ids, timeout)

    @contextlib.contextmanager
    def running(self, polling_interval: int, seed_path: Path, timeout: float) -> Iterator[str]:
        """Started, the seed model on the combiner and every client ready: yields the seed's model
        id; killed on the way out, however the tests went."""
        try:
            self.start(polling_interval)
            seed_id = self.combiner.put_model(load_npz_params(seed_path))  # as numpyhelper reads it
            self.wait_ready(timeout)
            yield seed_id
        finally:
            self.kill()

    def kill(self) -> None:
        """Teardown, clients before the combiner; safe to call after a clean stop."""
        self.combiner.health_check = None
        for node in self.nodes:
            node.kill()
        self.combiner.stop()

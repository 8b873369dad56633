"""Many clients on one box: N real ``scaleout client start`` processes against one client alone.

Every mode starts real clients (this worktree's ``client/`` package, ``--disable-managed-env``)
against the loopback test combiner (``tests/combiner.py``), gives each the same train task at
once (1 epoch, the package's default settings) from the same model, ``--rounds`` times, and
reports the total images/s of a round: the images all clients trained, over the time from
handing out the tasks to the last ``ModelUpdate`` (downloads, uploads and the 1 s polling
included). Round 1 reads the shards cold; later rounds find them cached. Then the peak RSS
(``VmHWM``) of every client process, and their sum.

Data: ``--images-per-client`` real MNIST images per client (the offline 5k subset, shuffled per
client and repeated: Fashion-MNIST is not installed here), one raw shard in ``client-<i>/train``.

Modes (``--modes``):

- ``alone``: ONE client, default threads (torch takes every core): the reference.
- ``default``: N clients started by hand, each with its own ``SCALEOUT_DATA_DIR`` and default
  threads: today's behaviour.
- ``alone-passive`` / ``passive``: ``alone`` / ``default`` with ``OMP_WAIT_POLICY=PASSIVE``
  (idle OpenMP threads sleep instead of spinning; libgomp reads it when torch is imported).
- ``budget``: as ``default`` plus ``CLIENT_NUMBER``/``TOTAL_N_CLIENTS`` and ``--threads-env``
  (``OMP_NUM_THREADS`` today, which torch reads at import) set to ``cores // N`` (at least 1).
  ``--threads-env ''`` sets no thread variable: for a package that budgets from
  ``TOTAL_N_CLIENTS`` by itself.
- ``lock``: as ``default`` plus one ``SCALEOUT_CLIENT_COMPUTE_LOCK`` path for all: scaleout 1.1's
  SDK serializes train/validate under it; 1.0.7 ignores it (the package must take it there).
- ``launch`` / ``launch-lock`` (scaleout 1.1): ``scaleoututil.launchers.launch_clients`` in a
  subprocess, N clients in one working directory, without / with ``serialize_compute``. The
  data root ``./data`` holds ``client-<i>/`` and, for a package that reads neither
  ``CLIENT_NUMBER`` nor ``TOTAL_N_CLIENTS``, ``train/`` = client 0's: the report counts the
  distinct data fingerprints the updates carry.

    nice -n 10 .venv-1.1/bin/python bench/many_clients.py [--clients 5 --images-per-client 6000]
        [--rounds 2 --modes alone,default,budget,lock,launch,launch-lock --env KEY=VALUE --out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the loopback combiner

import torch  # noqa: E402

from combiner import TRAIN, TestCombiner, enrollment_token  # noqa: E402
from mnist_edge import data, model  # noqa: E402
from perf_common import Report, images, load, machine  # noqa: E402

MODES = ("alone", "alone-passive", "default", "passive", "budget", "lock", "launch", "launch-lock")
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}  # OpenMP threads sleep at barriers instead of spinning
SCALEOUT = Path(sys.executable).parent / "scaleout"
POLL = 1  # seconds between a client's polls
READY_TIMEOUT = 300  # N clients importing torch on two busy cores
ROUND_TIMEOUT = 1800
CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "CLIENT_NUMBER", "TOTAL_N_CLIENTS")


@dataclass
class Fleet:
    """The client processes of one mode: started by hand, or by launch_clients (``launcher``)."""

    processes: list[subprocess.Popen] = field(default_factory=list)
    launcher: subprocess.Popen | None = None

    def client_pids(self) -> list[int]:
        if self.launcher is None:
            return [p.pid for p in self.processes]
        tasks = Path(f"/proc/{self.launcher.pid}/task")
        return sorted(int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split())

    def check_alive(self) -> None:
        for process in [*self.processes, *([self.launcher] if self.launcher else [])]:
            if process.poll() is not None:
                raise RuntimeError(f"process {process.args[:4]} exited with status {process.returncode}")

    def stop(self) -> None:
        everyone = [*self.processes, *([self.launcher] if self.launcher else [])]
        for process in everyone:
            if process.poll() is None:
                process.terminate()  # launch_clients passes SIGTERM on to its clients
        for process in everyone:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_data(root: Path, clients: int, per_client: int) -> list[Path]:
    dirs = []
    for i in range(clients):
        pixels, labels = images(per_client, seed=i)
        data.write_shard(root / f"client-{i}" / "train" / "shard-000.csv", pixels, labels)
        dirs.append(root / f"client-{i}")
    return dirs


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEOUT_") and k not in CLEARED}
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(PYTHONUNBUFFERED="1", SCALEOUT_GRPC_SECURE="false", SCALEOUT_CLIENT_TASK_POLLING_INTERVAL=str(POLL),
               SCALEOUT_HOME_DIR=str(home), TMPDIR=str(home / "tmp"), PATH=f"{SCALEOUT.parent}:{env['PATH']}")
    return env


def with_package(workdir: Path) -> Path:
    shutil.copytree(REPO / "client", workdir / "client", ignore=shutil.ignore_patterns("__pycache__", "data"))
    return workdir


def start_by_hand(combiner: TestCombiner, root: Path, data_dirs: list[Path], extra: dict) -> tuple[Fleet, list[str]]:
    fleet, names, total = Fleet(), [], len(data_dirs)
    for i, data_dir in enumerate(data_dirs):
        name, workdir = f"client-{i}", with_package(root / f"node-{i}")
        env = {**base_env(workdir), "SCALEOUT_DATA_DIR": str(data_dir),
               **{k: v.format(i=i, n=total) for k, v in extra.items()}}
        args = [SCALEOUT, "client", "start", "--api-url", combiner.api_url, "--client-id", name, "--name", name,
                "--disable-managed-env"]
        with open(workdir / "client.log", "wb") as log:
            fleet.processes.append(subprocess.Popen([str(a) for a in args], cwd=workdir, env=env, stdout=log,
                                                    stderr=subprocess.STDOUT, start_new_session=True))
        names.append(name)
    return fleet, names


def start_launched(combiner: TestCombiner, root: Path, data_dirs: list[Path], serialize: bool, extra: dict
                   ) -> tuple[Fleet, list[str]]:
    workdir = with_package(root / "launched")
    (workdir / "data").mkdir()
    for data_dir in data_dirs:
        (workdir / "data" / data_dir.name).symlink_to(data_dir)
    (workdir / "data" / "train").symlink_to(data_dirs[0] / "train")  # for a package that reads only ./data
    code = (f"import sys; from scaleoututil.launchers import launch_clients; sys.exit(launch_clients("
            f"api_url={combiner.api_url!r}, enrollment_token={enrollment_token()!r}, num_clients={len(data_dirs)}, "
            f"serialize_compute={serialize}, scaleout_bin={str(SCALEOUT)!r}, "
            f"extra_client_args=['--disable-managed-env']))")
    with open(workdir / "launcher.log", "wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=workdir,
            env={**base_env(workdir), **extra},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    fleet = Fleet(launcher=launcher)
    combiner.health_check = fleet.check_alive
    by_name = combiner.wait_until(
        lambda: (
            {r["name"]: r["client_id"] for r in combiner.registrations}
            if len(combiner.registrations) == len(data_dirs)
            else None
        ),
        READY_TIMEOUT,
        "the launched clients to register",
    )
    return fleet, [by_name[f"client-{i}"] for i in range(len(data_dirs))]


def start(
    mode: str, combiner: TestCombiner, root: Path, data_dirs: list[Path], threads_env: str, extra: dict
) -> tuple[Fleet, list[str]]:
    """Start the clients of ``mode``; ``extra`` (``--env``) goes into every client's environment."""
    cores = os.cpu_count() or 1
    if mode.startswith("alone"):
        return start_by_hand(combiner, root, data_dirs[:1], {**extra, **(PASSIVE if mode == "alone-passive" else {})})
    if mode in ("default", "passive"):
        return start_by_hand(combiner, root, data_dirs, {**extra, **(PASSIVE if mode == "passive" else {})})
    if mode == "budget":
        budget = {"CLIENT_NUMBER": "{i}", "TOTAL_N_CLIENTS": "{n}"}
        if threads_env:
            budget[threads_env] = str(max(1, cores // len(data_dirs)))
        return start_by_hand(combiner, root, data_dirs, {**extra, **budget})
    if mode == "lock":
        return start_by_hand(
            combiner, root, data_dirs, {**extra, "SCALEOUT_CLIENT_COMPUTE_LOCK": str(root / "compute.lock")}
        )
    return start_launched(combiner, root, data_dirs, mode == "launch-lock", extra)


def train_round(combiner: TestCombiner, ids: list[str], model_id: str, number: int) -> dict:
    began = time.monotonic()
    tasks = [
        combiner.submit_task(c, TRAIN, model_id, {"client_settings": {"epochs": 1}}, round_id=f"round-{number}")
        for c in ids
    ]
    failed = [
        (t.client_id, t.response) for t in combiner.wait_for_tasks(tasks, ROUND_TIMEOUT) if t.status != "COMPLETED"
    ]
    if failed:
        raise RuntimeError(f"round {number}: tasks failed: {failed}")
    updates = combiner.wait_for_messages(combiner.updates, tasks, ROUND_TIMEOUT, "model updates")
    wall = time.monotonic() - began
    metas = [json.loads(u.meta) for u in updates.values()]
    trained = sum(m["training_metadata"]["num_examples"] for m in metas)
    return {
        "images": trained,
        "wall": wall,
        "rate": trained / wall,
        "callbacks": [m["processing_time"] for m in metas],
        "fingerprints": len({m["training_metadata"].get("data_fingerprint") for m in metas}),
        "load": load(),
    }


def run_mode(mode: str, args: argparse.Namespace, root: Path, data_dirs: list[Path], report: Report) -> dict | None:
    if mode.startswith("launch"):
        try:
            import scaleoututil.launchers  # noqa: F401
        except ImportError:
            report(f"{mode}: skipped (no scaleoututil.launchers in this scaleout)")
            return None
    combiner = TestCombiner().start()
    fleet = Fleet()
    try:
        seed = combiner.put_model(model.get_parameters(seeded_net()))
        fleet, ids = start(mode, combiner, root / mode, data_dirs, args.threads_env, args.env)
        combiner.health_check = fleet.check_alive
        combiner.wait_for_clients(ids, READY_TIMEOUT)
        rounds = [train_round(combiner, ids, seed, r) for r in range(1, args.rounds + 1)]
        rss = [peak_rss_mib(pid) for pid in fleet.client_pids()]
    finally:
        combiner.health_check = None
        fleet.stop()
        combiner.stop()
    report(f"{mode} ({len(ids)} client{'s' if len(ids) > 1 else ''}):")
    for number, r in enumerate(rounds, 1):
        report(
            f"  round {number}: {r['images']} images in {r['wall']:.1f} s = {r['rate']:.0f} images/s total; "
            f"train callbacks {min(r['callbacks']):.1f}-{max(r['callbacks']):.1f} s; "
            f"{r['fingerprints']} distinct data fingerprint(s); {r['load']}"
        )
    report(f"  peak RSS per client (MiB): {', '.join(f'{m:.0f}' for m in rss)}; sum {sum(rss):.0f}")
    return {"rate": rounds[-1]["rate"], "rss": sum(rss), "clients": len(ids)}


def seeded_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return model.Net()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--images-per-client", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--threads-env", default="OMP_NUM_THREADS", help="budget mode's thread variable ('' none)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also set this in every client's environment (repeatable)",
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if any("=" not in pair for pair in args.env):
        parser.error(f"--env wants KEY=VALUE, got {next(p for p in args.env if '=' not in p)!r}")
    args.env = dict(pair.split("=", 1) for pair in args.env)
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r}; modes: {', '.join(MODES)}")

    report = Report()
    report(machine())
    report(
        f"{args.clients} clients x {args.images_per_client} images (mnist5k, shuffled per client, repeated), "
        f"1 epoch a round, {args.rounds} round(s) per mode; niceness {os.nice(0)}; {load()} at start"
        + "".join(f"; {k}={v} for every client" for k, v in args.env.items())
    )
    root = Path(tempfile.mkdtemp(prefix="many-clients-", dir=args.work))
    try:
        data_dirs = write_data(root / "data", args.clients, args.images_per_client)
        results = {mode: run_mode(mode, args, root, data_dirs, report) for mode in modes}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    references = [m for m in ("alone", "alone-passive") if results.get(m)]
    report(
        f"summary (last round): mode, clients, total images/s, {', '.join('/ ' + m for m in references)}, peak RSS sum"
    )
    for mode, r in results.items():
        if r is not None:
            ratios = "".join(f" {r['rate'] / results[m]['rate']:>7.2f}x" for m in references)
            report(f"  {mode:<13} {r['clients']:>2} {r['rate']:>7.0f}{ratios} {r['rss']:>7.0f} MiB")
    report.save(args.out)


if __name__ == "__main__":
    main()

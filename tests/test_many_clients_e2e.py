"""Many clients on one box, as scaleout 1.1's ``launch_clients`` starts them, on both client lines.

Two real ``scaleout client start`` processes in ONE working directory (the package in
``./client``, the data root ``./data`` holding ``client-0/`` and ``client-1/`` as ``prepare``
writes it), told their place only by ``CLIENT_NUMBER``/``TOTAL_N_CLIENTS`` and sharing
``SCALEOUT_CLIENT_COMPUTE_LOCK``: each trains on its own data, one computes at a time (1.1's SDK
takes the lock; on 1.0.7 the package does), and the ``node_status`` command tells a server which
node is which.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from combiner import TRAIN, TestCombiner
from conftest import CLIENT_LINE
from e2e_helpers import SCALEOUT, STOP_TIMEOUT, load_npz_params, package_tarball, quiet_env, unpack
from mnist_edge import data
from mnist_edge.prepare import prepare

pytestmark = pytest.mark.e2e
POLL = 1
TIMEOUT = 180


@pytest.fixture(scope="module")
def box(tmp_path_factory, seed_path):
    """The combiner and two clients started by hand exactly as launch_clients would start them."""
    root = tmp_path_factory.mktemp("box")
    unpack(package_tarball(root / "dist"), root)
    prepare("mnist5k", 2, root / "data", seed=3, test_fraction=0.1)
    combiner = TestCombiner().start()
    processes = []
    for number in range(2):
        env = quiet_env(root / f"home-{number}", SCALEOUT_GRPC_SECURE="false",
                        SCALEOUT_CLIENT_TASK_POLLING_INTERVAL=POLL, CLIENT_NUMBER=number, TOTAL_N_CLIENTS=2,
                        SCALEOUT_CLIENT_COMPUTE_LOCK=root / "compute.lock")
        with open(root / f"client-{number}.log", "wb") as log:
            processes.append(subprocess.Popen(
                [str(SCALEOUT), "client", "start", "--api-url", combiner.api_url, "--client-id", f"client-{number}",
                 "--name", f"client-{number}", "--disable-managed-env"],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        combiner.wait_for_clients(["client-0", "client-1"], TIMEOUT)
        yield root, combiner, load_npz_params(seed_path)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
        combiner.stop()


def test_node_status_tells_the_server_which_node_and_data_each_client_serves(box):
    root, combiner, _ = box
    for number in range(2):
        reply = combiner.command_reply(combiner.submit_command(f"client-{number}", "node_status"), TIMEOUT,
                                       attribute_keys=["node_status"])
        status = reply.task.response
        assert reply.task.status == "COMPLETED" and (status["client_number"], status["total_clients"]) == (number, 2)
        train = data.load_split(root / "data" / f"client-{number}", "train")
        assert status["splits"]["train"] == {"present": True, "usable": True, "images": len(train), "rows_skipped": 0,
                                             "shards": 1, "data_fingerprint": train.fingerprint}
        assert status["splits"]["predict"] == {"present": False}
        assert status["privacy"]["budget_epsilon"] is None and status["privacy"]["ledger"] == "verified"
        assert str(root) not in str(status)  # counts and fingerprints, no paths
        sent = reply.attributes["node_status"]
        assert (sent if CLIENT_LINE == "1.1" else json.loads(sent)) == status


def test_each_client_trains_on_its_own_data_and_one_computes_at_a_time(box):
    root, combiner, seed = box
    model_id = combiner.put_model(seed)
    tasks = [combiner.submit_task(f"client-{n}", TRAIN, model_id, {"client_settings": {"batch_size": 16}})
             for n in range(2)]
    updates = combiner.wait_for_messages(combiner.updates, tasks, TIMEOUT, "two model updates")
    windows = []
    for number, task in enumerate(tasks):
        meta = json.loads(updates[task].meta)["training_metadata"]
        assert meta["data_fingerprint"] == data.load_split(root / "data" / f"client-{number}", "train").fingerprint
        stamps = [m.timestamp.ToNanoseconds() for m in combiner.metrics if m.client_id == f"client-{number}"
                  and m.model_id == model_id]
        assert len(stamps) >= 3, stamps  # every 50 batches and at the epoch's end
        windows.append((min(stamps), max(stamps)))
    first, second = sorted(windows)
    assert first[1] < second[0], f"the two clients trained at the same time: {windows}"

"""What scaleout 1.0.7's client does with callbacks' values: the quirks README.rst documents.

A ten-line compute package of numpy callbacks (no torch, so clients start in a second or two)
runs inside real ``scaleout client start`` processes against the loopback combiner. These
tests pin the client's behaviour, not this package's: when an upgrade changes one, the test
fails and the README's "Known client quirks" section needs the same change.
``test_combiner_e2e.py`` shows how this package copes with each.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from combiner import INFER, TRAIN, VALIDATE, Task, TestCombiner
from e2e_helpers import SCALEOUT, EdgeNode, Fleet, quiet_env

pytestmark = pytest.mark.e2e

POLL = 1
TIMEOUT = 60

STARTUP = '''
import time

import numpy as np
from scaleoututil.helpers.helpers import get_helper
from scaleoututil.utils.model import ScaleoutModel

HELPER = get_helper("numpyhelper")


def startup(client):
    def train(model, settings):
        for _ in range(settings.get("batches", 1)):
            client.log_metric({"training_loss": 1.0})  # also checks for abort
            time.sleep(0.05)
        meta = {"training_metadata": {"num_examples": 1}, "training_loss": np.float32(0.5)}
        return ScaleoutModel.from_training_model(model.get_training_model(HELPER), HELPER), meta

    def validate(model):
        raise RuntimeError("validation broke")

    def infer(model, parameters):
        client.log_attributes({"log_metric_returned": str(client.log_metric({"x": 1.0}))})
        return {"summary": "never seen"}

    def probe_types(parameters):
        calls = {
            "metric_str": lambda: client.log_metric({"m": "1"}),
            "metric_none": lambda: client.log_metric({"m": None}),
            "attribute_int": lambda: client.log_attributes({"a": 1}),
        }
        outcome = {}
        for name, call in calls.items():
            try:
                outcome[name] = call()
            except TypeError:
                outcome[name] = "TypeError"
        return outcome

    client.set_train_callback(train)
    client.set_validate_callback(validate)
    client.set_inference_callback(infer)
    client.set_custom_callback("probe_types", probe_types)
    client.set_custom_callback("numpy_result", lambda parameters: {"value": np.float32(1.0)})
    client.set_custom_callback("raises", lambda parameters: 1 / 0)
'''


def write_package(workdir: Path, startup: str = STARTUP) -> None:
    package = workdir / "client"
    package.mkdir(parents=True)
    (package / "scaleout.yaml").write_text("entry_points:\n  startup: startup.py\n")
    (package / "startup.py").write_text(startup)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    nodes = []
    for name in ("quirky-0", "quirky-1"):
        workdir = tmp_path_factory.mktemp(name)
        write_package(workdir)
        nodes.append(EdgeNode(name, workdir, workdir / "data"))
    fleet = Fleet(TestCombiner(), nodes)
    try:
        fleet.start(POLL)
        fleet.wait_ready(TIMEOUT)
        yield fleet
    finally:
        fleet.kill()


@pytest.fixture(scope="module")
def model_id(fleet: Fleet) -> str:
    return fleet.combiner.put_model([np.arange(4, dtype=np.float32)])


def run_one(fleet: Fleet, task_type: str, model_id: str, data: dict | None = None) -> Task:
    """One task on the first client, waited for until it is reported done."""
    combiner = fleet.combiner
    [task] = combiner.wait_for_tasks([combiner.submit_task(fleet.ids[0], task_type, model_id, data)], TIMEOUT)
    return task


def start_once(combiner: TestCombiner, workdir: Path, *args: str, **env: str) -> tuple[int, str]:
    """``scaleout client start`` in ``workdir``, run until it exits by itself."""
    command = [str(SCALEOUT), "client", "start", *(args or ("--api-url", combiner.api_url))]
    result = subprocess.run(command, cwd=workdir, env=quiet_env(workdir, **env),
                            capture_output=True, text=True, timeout=TIMEOUT)
    return result.returncode, result.stdout + result.stderr


def assert_gives_up_with_status_0(
    combiner: TestCombiner, workdir: Path, error: str, *args: str, **env: str
) -> None:
    status, output = start_once(combiner, workdir, *args, **env)
    assert status == 0 and error in output, f"exit status {status}:\n{output[-2000:]}"


def test_the_client_exits_0_when_it_cannot_start(fleet: Fleet, tmp_path: Path) -> None:
    combiner, plaintext = fleet.combiner, {"SCALEOUT_GRPC_SECURE": "false"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_gives_up_with_status_0(combiner, empty, "[ERROR] Could not find scaleout.yaml", **plaintext)

    failing = tmp_path / "failing"
    write_package(failing, "def startup(client):\n    raise RuntimeError('no data here')\n")
    assert_gives_up_with_status_0(
        combiner, failing, "[ERROR] Error executing entrypoint 'startup': no data here", **plaintext
    )

    working = tmp_path / "working"
    write_package(working)
    # TLS is the default and the combiner is plaintext.
    assert_gives_up_with_status_0(combiner, working, "[ERROR] Could not initialize GRPC connection")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}"
    assert_gives_up_with_status_0(
        combiner, working, "[ERROR] Connect to Scaleout API - Error occurred", "--api-url", unreachable
    )
    # The attach mode never sets the client id.
    attach = ("--combiner", "127.0.0.1", "--combiner-port", str(combiner.port))
    assert_gives_up_with_status_0(
        combiner, working, "bad argument type for built-in operation", *attach, **plaintext
    )


def test_a_fractional_polling_interval_crashes_the_client(fleet: Fleet, tmp_path: Path) -> None:
    write_package(tmp_path)
    status, output = start_once(fleet.combiner, tmp_path, SCALEOUT_CLIENT_TASK_POLLING_INTERVAL="0.5")
    assert status == 1 and "ValueError: invalid literal for int() with base 10: '0.5'" in output


def test_a_validate_callback_that_raises_is_reported_completed_without_metrics(
    fleet: Fleet, model_id: str
) -> None:
    task = run_one(fleet, VALIDATE, model_id)
    assert (task.status, task.response) == ("COMPLETED", None)
    assert not [v for v in fleet.combiner.validations if v.correlation_id == task.correlation_id]


def test_the_inference_return_value_is_dropped_and_log_metric_has_no_context(
    fleet: Fleet, model_id: str
) -> None:
    task = run_one(fleet, INFER, model_id, {"parameters": {}})
    assert (task.status, task.response) == ("COMPLETED", None)
    attributes = [{a.key: a.value for a in m.attributes} for m in fleet.combiner.attributes]
    assert {"log_metric_returned": "False"} in attributes
    # The model stays staged in the working directory until someone deletes it.
    assert (fleet.nodes[0].workdir / ".model_cache" / f"{model_id}.scm").is_file()


def test_log_metric_takes_numbers_and_log_attributes_strings(fleet: Fleet) -> None:
    task = run_one(fleet, "Custom_probe_types", "", {"parameters": {}})
    assert task.status == "COMPLETED"
    assert task.response == {"metric_str": "TypeError", "metric_none": True, "attribute_int": "TypeError"}
    none_sent = [e.value for m in fleet.combiner.metrics for e in m.metrics if e.key == "m"]
    assert none_sent == [0.0]


def test_a_custom_callback_that_raises_is_reported_completed_without_response(fleet: Fleet) -> None:
    task = run_one(fleet, "Custom_raises", "", {"parameters": {}})
    assert (task.status, task.response) == ("COMPLETED", None)


def test_train_metadata_json_cannot_encode_fails_the_task_after_the_upload(
    fleet: Fleet, model_id: str
) -> None:
    uploads_before = len(fleet.combiner.uploads)
    task = run_one(fleet, TRAIN, model_id, {"client_settings": {}})
    assert task.status == "FAILED"
    assert "Object of type float32 is not JSON serializable" in task.response["error"]
    assert len(fleet.combiner.uploads) == uploads_before + 1  # orphaned: no SendModelUpdate names it
    assert not [u for u in fleet.combiner.updates if u.correlation_id == task.correlation_id]


def test_sigterm_during_a_task_exits_0_and_never_reports_the_task(fleet: Fleet, model_id: str) -> None:
    node, combiner = fleet.nodes[1], fleet.combiner
    cid = combiner.submit_task(node.name, TRAIN, model_id, {"client_settings": {"batches": 2000}})
    combiner.wait_for_status(cid, "RUNNING", TIMEOUT)
    combiner.health_check = None  # from here on clients are meant to exit
    node.sigterm()
    assert node.wait_exit() == 0
    assert (combiner.task(cid).status, combiner.task(cid).done) == ("RUNNING", False)


def test_a_custom_result_json_cannot_encode_stops_the_client(fleet: Fleet) -> None:
    node, combiner = fleet.nodes[0], fleet.combiner
    combiner.health_check = None
    cid = combiner.submit_task(node.name, "Custom_numpy_result", "", {"parameters": {}})
    assert node.wait_exit() == 0  # the polling thread died on json.dumps; the client gave up
    assert not combiner.task(cid).done
    assert "is not JSON serializable" in node.log_tail()

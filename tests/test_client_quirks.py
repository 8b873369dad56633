"""What each scaleout client line does with callbacks' values: the quirks docs/client-quirks.rst documents.

A ten-line compute package of numpy callbacks (no torch, so clients start in a second or two)
runs inside real ``scaleout client start`` processes against the loopback combiner. These
tests pin the client's behaviour, not this package's, on the line under test (``CLIENT_LINE``:
1.0.7 or 1.1): when an upgrade changes one, the test fails and docs/client-quirks.rst needs the
same change. ``test_combiner_e2e.py`` shows how this package copes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from combiner import INFER, TRAIN, VALIDATE, Task, TestCombiner, enrollment_token
from conftest import CLIENT_LINE, MODEL_CACHE, VENV_BIN
from e2e_helpers import SCALEOUT, STOP_TIMEOUT, EdgeNode, Fleet, quiet_env

pytestmark = pytest.mark.e2e

POLL = 1
TIMEOUT = 60
ON_1_1 = CLIENT_LINE == "1.1"

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
    client.set_custom_callback("ping", lambda parameters: client.log_attributes({"ping": parameters["token"]}))

    def report(parameters):
        client.log_attributes({"report_token": parameters["token"]})
        client.log_metric({"report_metric": 2.0})
        return {"echo": parameters, "answer": 42}

    client.set_custom_callback("Custom_report", report)  # already prefixed: registered as it is

    def survey():
        for step in range(2000):
            client.check_task_abort()
            time.sleep(0.05)
        return {"steps": step}

    if hasattr(client, "start_autonomous_task"):  # scaleout 1.1
        client.set_custom_callback("start_survey", lambda parameters: client.start_autonomous_task(
            survey, "survey", parameters).correlation_id)
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


def sent_everything_before(fleet: Fleet) -> None:
    """Return once the first client has sent all it queued before now.

    1.1 sends messages from a priority queue after the task that made them is reported done;
    an attribute queued now, in the lowest class any of them uses, arrives after them all.
    Only then does "nothing arrived" mean "nothing was sent".
    """
    token = str(uuid.uuid4())
    run_one(fleet, "Custom_ping", "", {"parameters": {"token": token}})
    fleet.combiner.wait_until(lambda: fleet.combiner.attributes_of(fleet.ids[0]).get("ping") == token,
                              TIMEOUT, "the ping attribute")


def start_once(combiner: TestCombiner, workdir: Path, *args: str, **env: str) -> tuple[int, str]:
    """``scaleout client start`` in ``workdir``, run until it exits by itself."""
    command = [str(SCALEOUT), "client", "start", *(args or ("--api-url", combiner.api_url))]
    result = subprocess.run(command, cwd=workdir, env=quiet_env(workdir, **env),
                            capture_output=True, text=True, timeout=TIMEOUT)
    return result.returncode, result.stdout + result.stderr


def assert_gives_up(combiner: TestCombiner, workdir: Path, status: int, error: str, *args: str, **env: str) -> None:
    exit_status, output = start_once(combiner, workdir, *args, **env)
    assert exit_status == status and error in output, f"exit status {exit_status}:\n{output[-2000:]}"


def test_the_client_exits_0_when_it_cannot_start(fleet: Fleet, tmp_path: Path) -> None:
    combiner, plaintext = fleet.combiner, {"SCALEOUT_GRPC_SECURE": "false"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_gives_up(combiner, empty, 0, "[ERROR] Could not find scaleout.yaml", **plaintext)

    failing = tmp_path / "failing"
    write_package(failing, "def startup(client):\n    raise RuntimeError('no data here')\n")
    assert_gives_up(combiner, failing, 0, "[ERROR] Error executing entrypoint 'startup': no data here", **plaintext)

    working = tmp_path / "working"
    write_package(working)
    # A TLS channel to a plaintext combiner: 1.0.7 uses TLS unless told otherwise; 1.1 follows the
    # combiner's grpc_secure (false here) unless SCALEOUT_GRPC_SECURE says true.
    tls = {"SCALEOUT_GRPC_SECURE": "true"} if ON_1_1 else {}
    assert_gives_up(combiner, working, 0, "[ERROR] Could not initialize GRPC connection", **tls)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}"
    # 1.0.7 gives up at once; 1.1 retries 4 times with backoff (about 8-15 s) first.
    error = ("[ERROR] Connect to Scaleout API - giving up after 5 attempts" if ON_1_1
             else "[ERROR] Connect to Scaleout API - Error occurred")
    assert_gives_up(combiner, working, 0, error, "--api-url", unreachable)


def test_the_attach_mode_fails_without_an_api_url(fleet: Fleet, tmp_path: Path) -> None:
    """``--combiner HOST --combiner-port PORT``: 1.0.7 never sets the client id, 1.1 crashes first."""
    write_package(tmp_path)
    attach = ("--combiner", "127.0.0.1", "--combiner-port", str(fleet.combiner.port))
    if ON_1_1:
        assert_gives_up(fleet.combiner, tmp_path, 1, "TypeError: argument of type 'NoneType' is not iterable",
                        *attach, SCALEOUT_GRPC_SECURE="false")
    else:
        assert_gives_up(fleet.combiner, tmp_path, 0, "bad argument type for built-in operation",
                        *attach, SCALEOUT_GRPC_SECURE="false")


@pytest.mark.skipif(not ON_1_1, reason="1.0.7 has no grpc_secure in the assignment: TLS unless told")
def test_without_scaleout_grpc_secure_the_client_follows_the_combiner(fleet: Fleet, tmp_path: Path) -> None:
    write_package(tmp_path)
    node = EdgeNode("follower", tmp_path, tmp_path / "data")
    args = [str(SCALEOUT), "client", "start", "--api-url", fleet.combiner.api_url, "--client-id", node.name]
    with open(node.log_path, "wb") as log:
        node.process = subprocess.Popen(args, cwd=tmp_path, env=quiet_env(tmp_path), stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        fleet.combiner.wait_for_clients([node.name], TIMEOUT)
        assert "Using combiner-reported grpc_secure=False" in node.log_tail()
    finally:
        node.kill()


def test_a_fractional_polling_interval_crashes_the_client(fleet: Fleet, tmp_path: Path) -> None:
    write_package(tmp_path)
    status, output = start_once(fleet.combiner, tmp_path, SCALEOUT_CLIENT_TASK_POLLING_INTERVAL="0.5")
    assert status == 1 and "ValueError: invalid literal for int() with base 10: '0.5'" in output


def test_a_validate_callback_that_raises_is_reported_completed_without_metrics(
    fleet: Fleet, model_id: str
) -> None:
    task = run_one(fleet, VALIDATE, model_id)
    assert (task.status, task.response) == ("COMPLETED", None)
    sent_everything_before(fleet)
    assert not [v for v in fleet.combiner.validations if v.correlation_id == task.correlation_id]


def test_the_inference_return_value_is_dropped_and_log_metric_has_no_context(
    fleet: Fleet, model_id: str
) -> None:
    task = run_one(fleet, INFER, model_id, {"parameters": {}})
    assert (task.status, task.response) == ("COMPLETED", None)
    returned = fleet.combiner.wait_until(
        lambda: fleet.combiner.attributes_of(fleet.ids[0]).get("log_metric_returned"), TIMEOUT,
        "the log_metric_returned attribute")
    assert returned == "False"
    # The model stays staged in the working directory until someone deletes it.
    assert (fleet.nodes[0].workdir / MODEL_CACHE / f"{model_id}.scm").is_file()


def test_log_metric_takes_numbers_and_log_attributes_values_per_line(fleet: Fleet) -> None:
    """Both: log_metric raises on a string and sends None as 0.0. log_attributes: 1.0.7 takes
    strings only (AttributeMessage), 1.1 any JSON value (AttributeRecord payload)."""
    task = run_one(fleet, "Custom_probe_types", "", {"parameters": {}})
    assert task.status == "COMPLETED"
    assert task.response == {"metric_str": "TypeError", "metric_none": True,
                             "attribute_int": True if ON_1_1 else "TypeError"}
    sent_everything_before(fleet)
    none_sent = [e.value for m in fleet.combiner.metrics for e in m.metrics if e.key == "m"]
    assert none_sent == [0.0]
    assert fleet.combiner.attributes_of(fleet.ids[0]).get("a") == (1 if ON_1_1 else None)


def test_a_custom_command_answers_in_the_task_response_with_its_attributes_and_metrics(fleet: Fleet) -> None:
    """Both lines: the return value is the report's response; what it logs arrives beside it."""
    token = str(uuid.uuid4())
    combiner = fleet.combiner
    reply = combiner.command_reply(combiner.submit_command(fleet.ids[0], "report", {"token": token}), TIMEOUT,
                                   attribute_keys=["report_token"])
    assert (reply.task.request.type, reply.task.status) == ("Custom_report", "COMPLETED")
    assert reply.task.response == {"echo": {"token": token}, "answer": 42}
    assert reply.attributes["report_token"] == token
    sent_everything_before(fleet)
    metrics = combiner.command_reply(reply.task.correlation_id, TIMEOUT).metrics
    assert [(e.key, e.value) for m in metrics for e in m.metrics] == [("report_metric", 2.0)]


def test_a_command_nobody_registered_fails_naming_its_task_type(fleet: Fleet) -> None:
    reply = fleet.combiner.command_reply(fleet.combiner.submit_command(fleet.ids[0], "nobody"), TIMEOUT)
    assert (reply.task.status, reply.task.response) == ("FAILED", {"error": "Unknown task type: Custom_nobody"})


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
    assert len(fleet.combiner.uploads) == uploads_before + 1  # orphaned: no ModelUpdate names it
    sent_everything_before(fleet)
    assert not [u for u in fleet.combiner.updates if u.correlation_id == task.correlation_id]


def test_empty_build_dependencies_make_an_installed_env_unverifiable(tmp_path: Path) -> None:
    """Both lines write an empty line for them into env_metadata.txt, then read it back as a
    dependency: ``scaleout run install`` fails and a managed env never verifies."""
    check = ("import sys; from scaleoututil.utils.environment import PythonEnv\n"
             "env = PythonEnv(build_dependencies=sys.argv[2:3], dependencies=['numpy'])\n"
             "env.set_path(sys.argv[1]); env.install_into_current_env(capture_output=True)\n"
             "print(env.verify_installed_env())")
    verified = [subprocess.run([str(VENV_BIN / "python"), "-c", check, str(tmp_path), *build], check=True,
                               capture_output=True, text=True, timeout=TIMEOUT).stdout.split()[-1]
                for build in ([], ["pip"])]  # numpy and pip are installed: pip installs nothing
    assert verified == ["False", "True"]


@pytest.mark.skipif(not ON_1_1, reason="autonomous tasks are 1.1's")
def test_an_autonomous_task_registers_with_the_combiner_and_can_be_stopped_by_it(fleet: Fleet) -> None:
    """The client reports a task it started with command_type until a directive names it back."""
    combiner = fleet.combiner
    started = run_one(fleet, "Custom_start_survey", "", {"parameters": {"area": 3}})
    assert started.status == "COMPLETED"
    task = combiner.wait_until(lambda: combiner.tasks_by_id().get(started.response), TIMEOUT,
                               "the autonomous task to register")
    assert (task.autonomous, task.request.type, task.client_id) == (True, "Autonomous_survey", fleet.ids[0])
    assert json.loads(task.request.data) == {"area": 3}
    combiner.interrupt(task.correlation_id)
    [stopped] = combiner.wait_for_tasks([task.correlation_id], TIMEOUT)
    assert stopped.status == "INTERRUPTED" and all(stopped.client_times), stopped.client_times
    assert stopped.registration_reports == 1  # the directive that named it back was the ack


@pytest.mark.skipif(not ON_1_1, reason="1.0.7 has no SCALEOUT_VENV_DIR")
def test_the_managed_env_folder_is_taken_from_scaleout_archive_dir() -> None:
    probe = "from scaleoututil.config import SCALEOUT_VENV_DIR; print(SCALEOUT_VENV_DIR)"
    env = {**os.environ, "SCALEOUT_ARCHIVE_DIR": "/srv/archive"}
    result = subprocess.run([str(VENV_BIN / "python"), "-c", probe], env=env, capture_output=True, text=True,
                            check=True, timeout=TIMEOUT)
    assert result.stdout.strip() == "/srv/archive"


def test_sigterm_during_a_task_exits_0_and_never_reports_the_task(fleet: Fleet, model_id: str) -> None:
    node, combiner = fleet.nodes[1], fleet.combiner
    cid = combiner.submit_task(node.name, TRAIN, model_id, {"client_settings": {"batches": 2000}})
    combiner.wait_for_status(cid, "RUNNING", TIMEOUT)
    combiner.health_check = None  # from here on clients are meant to exit
    node.sigterm()
    assert node.wait_exit() == 0
    assert (combiner.task(cid).status, combiner.task(cid).done) == ("RUNNING", False)


def test_a_custom_result_json_cannot_encode_fails_the_task_or_stops_the_client(fleet: Fleet) -> None:
    """1.0.7: the polling thread dies on json.dumps and the client exits 0; 1.1: the task FAILS."""
    node, combiner = fleet.nodes[0], fleet.combiner
    if ON_1_1:
        task = run_one(fleet, "Custom_numpy_result", "", {"parameters": {}})
        assert task.status == "FAILED" and "is not JSON serializable" in task.response["error"]
        node.check_alive()
        return
    combiner.health_check = None
    cid = combiner.submit_task(node.name, "Custom_numpy_result", "", {"parameters": {}})
    assert node.wait_exit() == 0  # the polling thread died on json.dumps; the client gave up
    assert not combiner.task(cid).done
    assert "is not JSON serializable" in node.log_tail()


LAUNCHED = '''
import os
import time

from scaleoututil.helpers.helpers import get_helper
from scaleoututil.utils.model import ScaleoutModel

HELPER = get_helper("numpyhelper")
PLACE = ("CLIENT_NUMBER", "TOTAL_N_CLIENTS", "SCALEOUT_CLIENT_COMPUTE_LOCK")


def startup(client):
    def train(model, settings):
        started = time.time()
        time.sleep(settings["seconds"])
        meta = {"training_metadata": {"num_examples": 1}, "window": [started, time.time()]}
        return ScaleoutModel.from_training_model(model.get_training_model(HELPER), HELPER), meta

    client.set_train_callback(train)
    client.set_custom_callback("place", lambda parameters: {**{k: os.environ.get(k) for k in PLACE},
                                                            "cwd": os.getcwd()})
'''


@pytest.mark.skipif(not ON_1_1, reason="scaleoututil.launchers is 1.1's")
def test_launch_clients_numbers_clients_in_one_directory_and_serializes_their_training(tmp_path: Path) -> None:
    """``launch_clients(serialize_compute=True)``: one enrollment token, one working directory, the
    place in CLIENT_NUMBER / TOTAL_N_CLIENTS, and train callbacks that never run at the same time."""
    write_package(tmp_path, LAUNCHED)
    combiner = TestCombiner().start()
    launch = (f"import sys; from scaleoututil.launchers import launch_clients; sys.exit(launch_clients("
              f"api_url={combiner.api_url!r}, enrollment_token={enrollment_token()!r}, "
              f"num_clients=2, serialize_compute=True, scaleout_bin={str(SCALEOUT)!r}, "
              f"extra_client_args=['--disable-managed-env']))")
    env = quiet_env(tmp_path, SCALEOUT_GRPC_SECURE="false", SCALEOUT_CLIENT_TASK_POLLING_INTERVAL=POLL)
    with open(tmp_path / "launcher.log", "wb") as log:
        launcher = subprocess.Popen([str(VENV_BIN / "python"), "-c", launch], cwd=tmp_path, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ids = combiner.wait_until(lambda: {r["name"]: r["client_id"] for r in combiner.registrations}
                                  if len(combiner.registrations) == 2 else None, TIMEOUT, "two clients to register")
        assert sorted(ids) == ["client-0", "client-1"] and len(combiner.enrollments) == 2
        combiner.wait_for_clients(ids.values(), TIMEOUT)
        places = {name: combiner.command_reply(combiner.submit_command(cid, "place"), TIMEOUT).task.response
                  for name, cid in ids.items()}
        assert [places[n]["CLIENT_NUMBER"] for n in sorted(places)] == ["0", "1"]
        assert {p["TOTAL_N_CLIENTS"] for p in places.values()} == {"2"}
        assert {p["cwd"] for p in places.values()} == {str(tmp_path)}
        [lock] = {p["SCALEOUT_CLIENT_COMPUTE_LOCK"] for p in places.values()}
        assert lock and lock.endswith("compute.lock")

        model_id = combiner.put_model([np.arange(4, dtype=np.float32)])
        settings = {"client_settings": {"seconds": 2}}
        tasks = [combiner.submit_task(cid, TRAIN, model_id, settings) for cid in ids.values()]
        updates = combiner.wait_for_messages(combiner.updates, tasks, TIMEOUT, "two model updates")
        first, second = sorted(json.loads(u.meta)["window"] for u in updates.values())
        assert first[1] <= second[0], f"train callbacks overlapped: {first} and {second}"
    finally:
        launcher.terminate()  # launch_clients passes SIGTERM on to its clients
        try:
            launcher.wait(STOP_TIMEOUT)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait(STOP_TIMEOUT)
            combiner.stop()

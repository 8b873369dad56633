"""LocalRuntime: the installed client line's runtime protocol, in-process, with that line's rules.

Everything goes through a real ``scaleout.EdgeClient``, as the callbacks' calls do; what the
runtime records is what a server would read. Tests of what only 1.1 has are skipped on 1.0.7.
"""

from __future__ import annotations

import inspect
import math
import threading

import pytest
from scaleout import EdgeClient
from scaleout.client.edge_client import EdgeClientRuntime
from scaleout.client.logging_context import LoggingContext

from conftest import CLIENT_LINE
from mnist_edge import edge, runtime

ON_1_1 = CLIENT_LINE == "1.1"
only_1_1 = pytest.mark.skipif(not ON_1_1, reason="scaleout 1.1's runtime protocol")


@pytest.fixture
def recorder() -> runtime.LocalRuntime:
    """The runtime the client hands everything to: what it records is what a server would read."""
    return runtime.LocalRuntime()


@pytest.fixture
def client(tmp_path, monkeypatch, recorder) -> EdgeClient:
    monkeypatch.chdir(tmp_path)  # EdgeClient makes its model cache in the working directory
    return EdgeClient(runtime=recorder)


def protocol_members() -> dict[str, object]:
    return {name: member for name, member in vars(EdgeClientRuntime).items()
            if not name.startswith("_") and (callable(member) or isinstance(member, property))}


def test_local_runtime_has_every_member_of_the_installed_lines_protocol() -> None:
    members = protocol_members()
    assert {"send_metric", "send_attributes", "check_task_abort"} <= set(members)
    for name, member in members.items():
        ours = inspect.getattr_static(runtime.LocalRuntime, name, None)
        assert ours is not None, f"LocalRuntime lacks {name}"
        if isinstance(member, property):
            assert isinstance(ours, property), name
        else:
            # Every parameter by name; 1.0.7 passes send_telemetry's dict positionally, which
            # LocalRuntime takes as 1.1 does.
            wanted, taken = inspect.signature(member).parameters, inspect.signature(ours).parameters
            assert set(wanted) <= set(taken) and len(wanted) <= len(taken), (name, list(wanted), list(taken))


def test_metrics_are_numbers_and_none_becomes_0_as_on_a_node(client: EdgeClient, recorder) -> None:
    with client.logging_context(LoggingContext(model_id="m", round_id="r", session_id="s")):
        assert client.log_metric({"training_loss": 1, "none": None})
        with pytest.raises(TypeError):
            client.log_metric({"training_loss": "0.5"})
    assert recorder.metrics == [{"metrics": {"training_loss": 1.0, "none": 0.0}, "model_id": "m", "step": 0,
                                 "round_id": "r"}]


def test_attributes_reach_the_server_as_plain_values_on_each_line(client: EdgeClient, recorder) -> None:
    values = {"count": 37, "accuracy": 0.5, "error": "bad row", "loss": math.nan}
    client.log_attributes(edge.attribute_values(values))
    if ON_1_1:  # AttributeRecord payloads: the values themselves; NaN is not JSON, so null
        assert recorder.attributes == [{"count": 37, "accuracy": 0.5, "error": "bad row", "loss": None}]
    else:  # AttributeMessage: strings only, numbers as their JSON text
        assert recorder.attributes == [{"count": "37", "accuracy": "0.5", "error": "bad row", "loss": "null"}]


def test_the_line_rejects_what_its_attribute_message_cannot_carry(client: EdgeClient, recorder) -> None:
    if ON_1_1:
        with pytest.raises(TypeError):
            client.log_attributes({"when": object()})
        client.log_attributes({"count": 3})
        assert recorder.attributes == [{"count": 3}]
    else:
        with pytest.raises(TypeError):
            client.log_attributes({"count": 3})


def test_telemetry_is_recorded_per_key(client: EdgeClient, recorder) -> None:
    if ON_1_1:
        assert client.log_telemetry(key="temperature", payload={"value": 41.5, "unit": "C"})
        assert recorder.telemetry == [{"key": "temperature", "payload": {"value": 41.5, "unit": "C"}}]
    else:
        assert client.log_telemetry({"memory_usage": 12.5})
        assert recorder.telemetry == [{"key": "memory_usage", "payload": {"value": 12.5}}]


@only_1_1
def test_edge_client_hands_itself_to_the_runtime_and_reads_a_healthy_link(client: EdgeClient, recorder) -> None:
    from scaleoututil.queue import LinkQuality

    assert recorder.client is client
    assert client.link_quality == LinkQuality.HEALTHY


@only_1_1
def test_inference_results_need_an_inference_context(client: EdgeClient, recorder) -> None:
    from scaleout.client.inference_context import InferenceContext

    assert client.log_inference_result("digit", {"label": 7}) is False
    with client.inference_context(InferenceContext(inference_id="i-1", model_id="m-1")):
        assert client.log_inference_result("digit", {"label": 7})
    assert recorder.inference_results == [
        {"key": "digit", "payload": {"label": 7}, "inference_id": "i-1", "model_id": "m-1"}]


@only_1_1
def test_an_autonomous_task_runs_on_its_own_thread_knows_its_id_and_can_be_aborted(client: EdgeClient,
                                                                                   recorder) -> None:
    seen, started = {}, threading.Event()

    def work() -> None:
        seen["task_id"] = recorder.get_current_task_id()
        started.set()
        while True:
            client.check_task_abort()
            started.wait(0.01)

    task = client.start_autonomous_task(work, "survey", {"area": 3})
    assert started.wait(10)
    assert task.request.type == "Autonomous_survey" and seen["task_id"] == task.correlation_id
    assert recorder.get_current_task_id() is None  # not on the task's thread
    with task.lock:
        task.interrupted, task.interrupted_reason = True, "Aborted by server"
    task.runner_thread.join(10)
    assert (task.done, task.status.value, task.response) == (True, "INTERRUPTED", {"msg": "Aborted by server"})


@only_1_1
def test_priority_classes_are_kept_with_the_queues_rules(client: EdgeClient) -> None:
    from scaleout import ClassOrder, PriorityClass

    urgent = PriorityClass(name="urgent", priority=90, order=ClassOrder.FIFO)
    client.add_priority_class(urgent)
    with pytest.raises(ValueError, match="already exists"):
        client.add_priority_class(urgent)
    client.replace_priority_class(PriorityClass(name="urgent", priority=95, order=ClassOrder.LIFO))
    assert [(c.name, c.priority) for c in client.priority_classes] == [("urgent", 95)]
    assert client.remove_priority_class("urgent") == 0
    with pytest.raises(KeyError):
        client.replace_priority_class(urgent)

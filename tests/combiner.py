"""A loopback combiner: the smallest server a real ``scaleout client start`` can work against.

It exists so CI can run the compute package exactly as users do, inside the real Scaleout
client, without a Scaleout Edge deployment. It is test-only code and doubles as documentation
of the protocol both client lines speak (read from ``scaleout/client/*.py`` of 1.0.7 and 1.1.0);
it uses the installed line's ``scaleoututil.grpc`` modules, so it serves exactly the RPCs and
fields of that line's proto:

1. At start the client makes one HTTP call, ``POST {api_url}/api/v1/clients/add`` with
   ``{name, client_id, preferred_combiner, package, client_version}``. A 200 answer carries
   ``client_id`` (which the client adopts) and the combiner's ``public_hostname`` and ``port``;
   1.1 also reads ``grpc_secure`` (this combiner says ``false``) and follows it unless
   ``SCALEOUT_GRPC_SECURE`` is set. 1.0.7 uses TLS unless ``SCALEOUT_GRPC_SECURE=false``.
2. gRPC. Every call carries the metadata ``client-id`` and ``name``. First
   ``Announce(type="VersionCheck")``: the response's ``parameters`` must be JSON with
   ``"success": true`` or the client gives up (exit status 0).
3. ``Announce(type="Connect")`` when polling starts, ``Announce(type="Disconnect")`` on SIGTERM
   (both skipped when ``SCALEOUT_GRACEFUL_GRPC_HANDLING=false``).
4. Every ``SCALEOUT_CLIENT_TASK_POLLING_INTERVAL`` seconds (an int, default 5) the client calls
   the unary ``PollAndReportAsync(ClientReport) -> CombinerDirective``. The report lists every
   task the client holds: status (PENDING, RUNNING, COMPLETED, FAILED, INTERRUPTED), ``done`` and
   a JSON ``response``; a done task is reported once, then forgotten. The directive's
   ``TaskRequest``\\ s with an unknown ``correlation_id`` are new tasks; one with a known id and
   status ``INTERRUPTED`` (or ``TIMEOUT``) makes the client's next ``check_task_abort`` raise.
   1.1 adds ``poll_interval_ms`` and ``skip_polling_tasks`` (true: deliver no new tasks) to the
   report, ``started_at``/``completed_at`` to each activity, and registers a task the client
   started itself (autonomous) by reporting it with ``command_type`` and ``parameters`` until a
   directive names its correlation id.
5. Task types: ``Scaleout_ModelUpdate`` downloads ``model_id``, trains with
   ``json.loads(data)["client_settings"]``, uploads the new model, then sends ``ModelUpdate`` with
   JSON ``meta``. ``Scaleout_Validation`` downloads, validates and sends ``ModelValidation`` with
   the metrics as JSON ``data``. ``Scaleout_Inference`` downloads into the model cache
   (1.0.7: ``./.model_cache``, 1.1: ``./.scaleout/model_cache``) and runs the inference callback
   with ``json.loads(data)["parameters"]``; nothing comes back but what the callback logs.
   ``Custom_<name>``: see 9.
6. Side channels: ``SendModelMetric`` (``client.log_metric``, float values only) and
   ``SendStatus`` around train and validate. 1.0.7: ``SendAttributeMessage``
   (``client.log_attributes``, string values only) and ``SendTelemetryMessage`` every 5 s.
   1.1: bidirectional streams ``StreamAttributeRecord`` (one record per key, payload
   ``{"value": v}`` as JSON), ``StreamTelemetryRecord`` (``memory_usage``/``cpu_usage`` every
   5 s) and ``StreamInferenceResult``, each record acknowledged by a ``RecordAck`` naming its id;
   ``SendHeartbeat`` (with ``heartbeat_interval_ms``) and ``SendBacklogReport`` every 30 s.
   Telemetry stops with ``SCALEOUT_CLIENT_SEND_TELEMETRY=false``.
7. 1.0.7 sends each message before the task is reported done. 1.1 queues ModelUpdate,
   ModelValidation, metrics, attributes and status by priority class (model_update before
   artifact) and sends them from another thread, so a task can be reported COMPLETED before
   its update arrives: wait for the message itself (:meth:`TestCombiner.wait_for_messages`).
8. Models are ScaleoutModel ZIPs. ``Download`` streams ``FileChunk``\\ s and may set the
   trailing metadata ``checksum``, which the client verifies; ``Upload`` streams chunks with the
   metadata ``model-id`` and ``checksum`` and expects a ``ModelResponse``.
9. Custom commands (:meth:`TestCombiner.submit_command`). ``set_custom_callback(name, f)``
   registers ``f`` under ``Custom_<name>`` on both lines (the prefix is added when missing), so
   the task type the server sends is ``Custom_<name>``; a type nobody registered is FAILED with
   ``{"error": "Unknown task type: Custom_<name>"}``. The callback gets
   ``json.loads(data)["parameters"]`` (``{}`` when absent), not the TaskRequest, and runs with the
   request's round and session as its metrics' context. Its return value is the task's report
   ``response`` (JSON; omitted when falsy). An exception in it is swallowed: COMPLETED, no
   response. A value json cannot encode: 1.1 FAILS the task; 1.0.7's polling thread dies on it and
   the client exits 0. Attributes it logs arrive separately (1.1: after the task may be done).
10. Enrollment (1.1, what ``scaleoututil.launchers.launch_clients`` hands every client):
   ``--token`` with a JWT whose claim ``role`` is ``enrollment`` makes ``scaleout client start``
   call ``POST /api/v1/clients/enroll`` (``{name, client_id?}``, ``Authorization: Bearer``) for
   ``{client_id, access_token, refresh_token}`` before step 1; the client adopts that id, keeps
   only the refresh token, and trades it at ``POST /api/v1/clients/token``
   (``{refresh_token, role}`` -> ``{access_token, refresh_token}``) before it registers.
   Signatures are not checked by the client; this combiner issues unsigned tokens that expire in
   a day (:func:`enrollment_token`).
11. The dispatcher client (``scaleout client start --dispatcher``) speaks the same protocol;
   only its train and validate run ``entry_points.<train|validate>.command IN OUT`` in a
   subprocess (``scaleout/client/dispatcher_client.py``). A command that exits non-zero reaches
   the server as a FAILED train task with ``{"error": "Train callback returned None model."}`` or
   a COMPLETED validation without a ``ModelValidation``; its output never does. Custom commands
   are not registered there: every ``Custom_*`` task FAILS as an unknown type.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

import grpc
import numpy as np
import scaleoututil.grpc.scaleout_pb2 as msg
import scaleoututil.grpc.scaleout_pb2_grpc as rpc
from scaleoututil.helpers.helpers import get_helper
from scaleoututil.utils.model import ScaleoutModel

TRAIN = "Scaleout_ModelUpdate"
VALIDATE = "Scaleout_Validation"
INFER = "Scaleout_Inference"
DONE_STATUSES = ("COMPLETED", "FAILED", "INTERRUPTED")
CUSTOM_PREFIX = "Custom_"  # what set_custom_callback puts before a command's name, on both lines
HELPER = get_helper("numpyhelper")


def command_type(name: str) -> str:
    """The task type a client runs ``set_custom_callback(name, ...)`` for."""
    return name if name.startswith(CUSTOM_PREFIX) else CUSTOM_PREFIX + name


def unsigned_jwt(claims: dict[str, Any]) -> str:
    """A JWT with ``alg: none``: the client reads claims without checking signatures."""
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def enrollment_token() -> str:
    """What ``scaleout client create-enrollment-token`` would give an admin, for this combiner."""
    return unsigned_jwt({"role": "enrollment", "exp": int(time.time()) + 86400})


def record_value(payload: str) -> Any:
    """What a 1.1 record's JSON payload says: ``{"value": v}`` is ``v``, anything else itself."""
    decoded = json.loads(payload)
    return decoded["value"] if isinstance(decoded, dict) and set(decoded) == {"value"} else decoded


@dataclass
class Task:
    """One task as the combiner sees it: what was asked, and what the client last reported."""

    request: msg.TaskRequest
    status: str = "NEW"  # NEW until the client first reports on it
    response: dict[str, Any] | None = None
    done: bool = False
    delivered_at: float | None = None  # when a directive first named it (for autonomous: acked)
    interrupt_requested: bool = False
    interrupt_delivered_at: float | None = None
    finished_at: float | None = None
    seen_statuses: list[str] = field(default_factory=list)
    autonomous: bool = False  # started by the client itself (1.1), registered by its first report
    client_times: tuple[Any, Any] = (None, None)  # 1.1: the client's started_at, completed_at
    registration_reports: int = 0  # 1.1: reports that carried command_type (1 once acked)
    attributes_before: int = 0  # how many attribute messages had arrived when it was submitted

    @property
    def correlation_id(self) -> str:
        return self.request.correlation_id

    @property
    def client_id(self) -> str:
        return self.request.client_id


@dataclass
class CommandReply:
    """Everything the server received for one custom command."""

    task: Task  # status and response: the callback's return value, or the client's error
    attributes: dict[str, Any]  # sent by the client since the command was submitted, latest per key
    metrics: list[msg.ModelMetric]  # logged inside the callback (tagged with the command's round)


class CombinerTimeout(AssertionError):
    """A wait ran out; the message says what was awaited and what had happened instead."""


class TestCombiner:
    """Loopback combiner: serves tasks and models to real clients and records what they send.

    Use it as a context manager. ``health_check`` is called while waiting and may raise to end
    a wait early, e.g. when a client process has died.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, health_check: Callable[[], None] | None = None) -> None:
        self.health_check = health_check
        self._lock = threading.Condition()
        self._models: dict[str, bytes] = {}
        self._tasks: dict[str, Task] = {}
        self._polls: dict[str, int] = {}  # client id -> number of PollAndReportAsync calls
        self.poll_intervals_ms: dict[str, set[int]] = {}  # 1.1: what each client says it polls at
        self.registrations: list[dict[str, Any]] = []
        self.enrollments: list[dict[str, Any]] = []  # 1.1: POST /api/v1/clients/enroll bodies
        self.announces: list[msg.ClientAnnounceRequest] = []
        self.updates: list[msg.ModelUpdate] = []
        self.validations: list[msg.ModelValidation] = []
        self.metrics: list[msg.ModelMetric] = []
        self.attributes: list[Any] = []  # 1.0.7 AttributeMessage / 1.1 AttributeRecord, as received
        self.statuses: list[msg.Status] = []
        self.telemetry: list[Any] = []  # 1.0.7 TelemetryMessage / 1.1 TelemetryRecord
        self.inference_results: list[Any] = []  # 1.1 InferenceResult
        self.heartbeats: list[msg.Heartbeat] = []
        self.backlog_reports: list[Any] = []  # 1.1 BacklogReport
        self.uploads: list[str] = []  # model ids, in upload order
        self.protocol_errors: list[str] = []  # what a client sent that the protocol does not allow
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.port = 0
        self.http_port = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> TestCombiner:
        from combiner_rpc import CombinerClient, ModelService, make_http_handler  # noqa: PLC0415 (they import Task)

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=32))  # streams hold a thread each
        rpc.add_CombinerClientServicer_to_server(CombinerClient(self), self._grpc)
        rpc.add_ModelServiceServicer_to_server(ModelService(self), self._grpc)
        self.port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), make_http_handler(self))
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="combiner-http", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait(5)
            self._grpc = None

    def __enter__(self) -> TestCombiner:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- models ----------------------------------------------------------------------------

    def put_model(self, model: ScaleoutModel | bytes | Sequence[np.ndarray]) -> str:
        """Store a model (ScaleoutModel, its ZIP bytes, or numpy parameters); return its id."""
        if isinstance(model, ScaleoutModel):
            with model.get_file_stream() as f:
                data, model_id = f.read(), model.model_id
        elif isinstance(model, bytes):
            data = model
            with ScaleoutModel.from_stream(io.BytesIO(data)) as parsed:
                model_id = parsed.model_id
        else:
            with ScaleoutModel.from_training_model(list(model), HELPER) as built:
                return self.put_model(built)
        if not model_id:
            raise ValueError("model has no model_id in its metadata.json; is it a ScaleoutModel ZIP?")
        with self._lock:
            self._models[model_id] = data
            self._lock.notify_all()
        return model_id

    def get_model(self, model_id: str) -> ScaleoutModel:
        """The stored model; the caller should close() it (it owns a temp file)."""
        with self._lock:
            data = self._models.get(model_id)
        if data is None:
            raise KeyError(f"combiner has no model {model_id!r}")
        return ScaleoutModel.from_stream(io.BytesIO(data))

    def model_bytes(self, model_id: str) -> bytes | None:
        with self._lock:
            return self._models.get(model_id)

    def get_params(self, model_id: str) -> list[np.ndarray]:
        with self.get_model(model_id) as model:
            return model.get_training_model(HELPER)

    # -- tasks -----------------------------------------------------------------------------

    def submit_task(
        self,
        client_id: str,
        task_type: str,
        model_id: str,
        data: dict[str, Any] | None = None,
        round_id: str = "",
        session_id: str = "e2e",
    ) -> str:
        """Queue a task for the client's next poll; return its correlation id."""
        request = msg.TaskRequest(
            model_id=model_id,
            data=json.dumps(data or {}),  # the client json.loads it unconditionally
            correlation_id=str(uuid.uuid4()),
            timestamp=str(time.time()),
            session_id=session_id,
            round_id=round_id,
            type=task_type,
            status="NEW",
            client_id=client_id,
        )
        with self._lock:
            self._tasks[request.correlation_id] = Task(request, attributes_before=len(self.attributes))
        return request.correlation_id

    def submit_command(self, client_id: str, name: str, parameters: dict[str, Any] | None = None) -> str:
        """Queue the custom command ``name`` (``Custom_`` added) with ``parameters``; return its id.

        It gets a round of its own (``command-<id>``) so the metrics it logs can be told apart.
        """
        return self.submit_task(client_id, command_type(name), "", {"parameters": parameters or {}},
                                round_id=f"command-{uuid.uuid4()}")

    def command_reply(self, correlation_id: str, timeout: float, attribute_keys: Iterable[str] = ()) -> CommandReply:
        """What the server got for a command once it is done and ``attribute_keys`` have arrived.

        1.1 sends attributes after the task may be reported done: name the keys to wait for.
        """
        task = self.wait_for_tasks([correlation_id], timeout)[0]
        keys = set(attribute_keys)

        def arrived() -> dict[str, Any] | None:
            got = self._attributes_since(task.client_id, task.attributes_before)
            return got if keys <= set(got) else None

        attributes = self.wait_until(arrived, timeout, f"attributes {sorted(keys)} from {task.client_id}") if keys \
            else self._attributes_since(task.client_id, task.attributes_before)
        with self._lock:
            metrics = [m for m in self.metrics if m.round_id == task.request.round_id]
        return CommandReply(task, attributes, metrics)

    def interrupt(self, correlation_id: str) -> None:
        """Ask the client to abort the task; sent with its next poll unless the task is done."""
        with self._lock:
            self._tasks[correlation_id].interrupt_requested = True

    def task(self, correlation_id: str) -> Task:
        with self._lock:
            return self._tasks[correlation_id]

    def tasks_by_id(self) -> dict[str, Task]:
        """Every task, those the clients started themselves (1.1) included, by correlation id."""
        with self._lock:
            return dict(self._tasks)

    # -- what the clients sent, as a server reads it ---------------------------------------

    def attributes_of(self, client_id: str) -> dict[str, Any]:
        """The client's attributes, latest value per key: 1.0.7 strings, 1.1 the payload's value."""
        return self._attributes_since(client_id, 0)

    def _attributes_since(self, client_id: str, first: int) -> dict[str, Any]:
        with self._lock:
            received = [m for m in self.attributes[first:] if m.client_id == client_id]
        values: dict[str, Any] = {}
        for message in received:
            if isinstance(message, msg.AttributeMessage):
                values.update({a.key: a.value for a in message.attributes})
            else:
                values[message.key] = record_value(message.payload)
        return values

    # -- waiting ---------------------------------------------------------------------------

    def wait_until(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        """Return condition()'s first truthy value, checked whenever a client calls in."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = condition()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CombinerTimeout(
                        f"timed out after {timeout:.0f} s waiting for {what}; {self.summary()}"
                    )
                self._lock.wait(min(remaining, 0.5))
                if self.health_check is not None:
                    self.health_check()

    def wait_for_clients(self, client_ids: Iterable[str], timeout: float) -> None:
        """Wait until every client has polled at least once (it is then ready for tasks)."""
        ids = list(client_ids)
        self.wait_until(lambda: all(self._polls.get(c) for c in ids), timeout, f"clients {ids} to poll")

    def wait_for_tasks(self, correlation_ids: Iterable[str], timeout: float) -> list[Task]:
        """Wait until the clients have reported every task done; return them in order."""
        ids = list(correlation_ids)
        self.wait_until(lambda: all(self._tasks[c].done for c in ids), timeout, f"{len(ids)} tasks to finish")
        return [self.task(c) for c in ids]

    def wait_for_messages(self, messages: list, correlation_ids: Iterable[str], timeout: float, what: str) -> dict:
        """The message (update, validation) each task sent, by correlation id, once all arrived.

        1.1 may report a task COMPLETED before its queued message is sent, so this waits for the
        message itself rather than for the task's status.
        """
        ids = list(correlation_ids)

        def arrived() -> dict | None:
            by_task = {m.correlation_id: m for m in messages if m.correlation_id in ids}
            return by_task if len(by_task) == len(ids) else None

        return self.wait_until(arrived, timeout, f"{what} from {len(ids)} tasks")

    def wait_for_status(self, correlation_id: str, status: str, timeout: float) -> Task:
        self.wait_until(
            lambda: status in self._tasks[correlation_id].seen_statuses,
            timeout,
            f"task {correlation_id} to report {status}",
        )
        return self.task(correlation_id)

    def summary(self) -> str:
        """One line on the state of every task, for failure messages."""
        with self._lock:
            tasks = ", ".join(
                f"{t.request.type}@{t.client_id}={t.status}{'(done)' if t.done else ''}"
                for t in self._tasks.values()
            )
            return f"polls={dict(self._polls)} tasks=[{tasks}]"

    # -- handlers (called from server threads) --------------------------------------------

    def _register(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.registrations.append(body)
        return {
            "client_id": body["client_id"],
            "public_hostname": "127.0.0.1",
            "port": self.port,
            "package": body.get("package", "local"),
            "helper_type": HELPER.name,
            "grpc_secure": False,  # read by 1.1 only
        }

    def _enroll(self, body: dict[str, Any]) -> dict[str, Any]:
        """An enrolled client's identity: its requested id, else one made from its name."""
        with self._lock:
            self.enrollments.append(body)
        client_id = body.get("client_id") or f"{body.get('name', 'client')}-{uuid.uuid4().hex[:8]}"
        return {"client_id": client_id, **self._tokens(client_id)}

    def _refresh(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/v1/clients/token``: the CLI keeps only the refresh token from enrolling."""
        claims = json.loads(base64.urlsafe_b64decode(body["refresh_token"].split(".")[1] + "=="))
        return self._tokens(claims["sub"])

    @staticmethod
    def _tokens(client_id: str) -> dict[str, str]:
        expires = int(time.time()) + 86400
        return {
            "access_token": unsigned_jwt({"sub": client_id, "role": "client", "exp": expires}),
            "refresh_token": unsigned_jwt({"sub": client_id, "role": "client_refresh", "exp": expires}),
        }

    def _record(self, records: list, message: Any) -> msg.Response:
        with self._lock:
            records.append(message)
            self._lock.notify_all()
        return msg.Response(response="ok")

    def _store_upload(self, data: bytes) -> str:
        model_id = self.put_model(data)
        with self._lock:
            self.uploads.append(model_id)
        return model_id

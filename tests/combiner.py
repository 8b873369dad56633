"""A loopback combiner: the smallest server a real ``scaleout client start`` can work against.

It exists so CI can run the compute package exactly as users do, inside the real Scaleout
client, without a Scaleout Edge deployment. It is test-only code and doubles as documentation
of the protocol scaleout 1.0.7 speaks (read from ``scaleout/client/*.py``):

1. At start the client makes one HTTP call, ``POST {api_url}/api/v1/clients/add`` with
   ``{name, client_id, preferred_combiner, package, client_version}``. A 200 answer carries
   ``client_id`` (which the client adopts) and the combiner's ``public_hostname`` and ``port``.
2. gRPC, plaintext when ``SCALEOUT_GRPC_SECURE=false``. Every call carries the metadata
   ``client-id`` and ``name``. First ``Announce(type="VersionCheck")``: the response's
   ``parameters`` must be JSON with ``"success": true`` or the client gives up (exit status 0).
3. ``Announce(type="Connect")`` when polling starts, ``Announce(type="Disconnect")`` on SIGTERM
   (both skipped when ``SCALEOUT_GRACEFUL_GRPC_HANDLING=false``).
4. Every ``SCALEOUT_CLIENT_TASK_POLLING_INTERVAL`` seconds (an int, default 5) the client calls
   the unary ``PollAndReportAsync(ClientReport) -> CombinerDirective``. The report lists every
   task the client holds: status (PENDING, RUNNING, COMPLETED, FAILED, INTERRUPTED), ``done`` and
   a JSON ``response``; a done task is reported once, then forgotten. The directive's
   ``TaskRequest``\\ s with an unknown ``correlation_id`` are new tasks; one with a known id and
   status ``INTERRUPTED`` (or ``TIMEOUT``) makes the client's next ``check_task_abort`` raise.
5. Task types: ``Scaleout_ModelUpdate`` downloads ``model_id``, trains with
   ``json.loads(data)["client_settings"]``, uploads the new model, then ``SendModelUpdate`` with
   JSON ``meta``. ``Scaleout_Validation`` downloads, validates and ``SendModelValidation`` with
   the metrics as JSON ``data``. ``Scaleout_Inference`` downloads into ``./.model_cache`` and
   runs the inference callback with ``json.loads(data)["parameters"]``; nothing comes back but
   what the callback logs. ``Custom_<name>`` runs a registered callback with ``parameters``.
6. Side channels: ``SendModelMetric`` (``client.log_metric``, float values only),
   ``SendAttributeMessage`` (``client.log_attributes``, string values only), ``SendStatus``
   around train and validate, ``SendTelemetryMessage`` every 5 s unless
   ``SCALEOUT_CLIENT_SEND_TELEMETRY=false``.
7. Models are ScaleoutModel ZIPs. ``Download`` streams ``FileChunk``\\ s and may set the
   trailing metadata ``checksum``, which the client verifies; ``Upload`` streams chunks with the
   metadata ``model-id`` and ``checksum`` and expects a ``ModelResponse``.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
CHUNK_SIZE = 64 * 1024
HELPER = get_helper("numpyhelper")


@dataclass
class Task:
    """One task as the combiner sees it: what was asked, and what the client last reported."""

    request: msg.TaskRequest
    status: str = "NEW"  # NEW until the client first reports on it
    response: dict[str, Any] | None = None
    done: bool = False
    delivered_at: float | None = None
    interrupt_requested: bool = False
    interrupt_delivered_at: float | None = None
    finished_at: float | None = None
    seen_statuses: list[str] = field(default_factory=list)

    @property
    def correlation_id(self) -> str:
        return self.request.correlation_id

    @property
    def client_id(self) -> str:
        return self.request.client_id


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
        self.registrations: list[dict[str, Any]] = []
        self.announces: list[msg.ClientAnnounceRequest] = []
        self.updates: list[msg.ModelUpdate] = []
        self.validations: list[msg.ModelValidation] = []
        self.metrics: list[msg.ModelMetric] = []
        self.attributes: list[msg.AttributeMessage] = []
        self.statuses: list[msg.Status] = []
        self.telemetry: list[msg.TelemetryMessage] = []
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
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        rpc.add_CombinerClientServicer_to_server(_CombinerClient(self), self._grpc)
        rpc.add_ModelServiceServicer_to_server(_ModelService(self), self._grpc)
        self.port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _make_http_handler(self))
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
            self._tasks[request.correlation_id] = Task(request)
        return request.correlation_id

    def interrupt(self, correlation_id: str) -> None:
        """Ask the client to abort the task; sent with its next poll unless the task is done."""
        with self._lock:
            self._tasks[correlation_id].interrupt_requested = True

    def task(self, correlation_id: str) -> Task:
        with self._lock:
            return self._tasks[correlation_id]

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
        }

    def _poll(self, report: msg.ClientReport) -> msg.CombinerDirective:
        now = time.monotonic()
        with self._lock:
            self._polls[report.client_id] = self._polls.get(report.client_id, 0) + 1
            for activity in report.reports:
                self._record_activity(activity, now)
            directive = msg.CombinerDirective()
            for task in self._tasks.values():
                if task.client_id != report.client_id or task.done:
                    continue
                if task.delivered_at is None:
                    directive.tasks.append(task.request)
                    task.delivered_at = now
                elif task.interrupt_requested and task.interrupt_delivered_at is None:
                    interrupt = msg.TaskRequest()
                    interrupt.CopyFrom(task.request)
                    interrupt.status = "INTERRUPTED"
                    directive.tasks.append(interrupt)
                    task.interrupt_delivered_at = now
            self._lock.notify_all()
        return directive

    def _record_activity(self, activity: msg.ActivityReport, now: float) -> None:
        task = self._tasks.get(activity.correlation_id)
        if task is None:
            self.protocol_errors.append(f"report on unknown task {activity.correlation_id}")
            return
        if task.done:
            self.protocol_errors.append(f"second report on finished task {activity.correlation_id}")
        task.status = activity.status
        if activity.status not in task.seen_statuses:
            task.seen_statuses.append(activity.status)
        if activity.response:
            task.response = json.loads(activity.response)
        if activity.done and not task.done:
            task.done, task.finished_at = True, now

    def _record(self, records: list, message: Any) -> msg.Response:
        with self._lock:
            records.append(message)
            self._lock.notify_all()
        return msg.Response(response="ok")

    def _download(self, model_id: str, context: grpc.ServicerContext) -> Iterator[msg.FileChunk]:
        with self._lock:
            data = self._models.get(model_id)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {model_id}")
        with ScaleoutModel.from_stream(io.BytesIO(data)) as model:
            context.set_trailing_metadata((("checksum", model.checksum),))
        for start in range(0, len(data), CHUNK_SIZE):
            yield msg.FileChunk(data=data[start : start + CHUNK_SIZE])

    def _upload(self, chunks: Iterator[msg.FileChunk], context: grpc.ServicerContext) -> msg.ModelResponse:
        headers = dict(context.invocation_metadata())
        data = b"".join(chunk.data for chunk in chunks)
        with ScaleoutModel.from_stream(io.BytesIO(data)) as model:
            if model.model_id != headers.get("model-id"):
                return msg.ModelResponse(status=msg.FAILED, message="model-id header does not match the ZIP")
            if not model.verify_checksum(headers.get("checksum")):
                return msg.ModelResponse(status=msg.FAILED, message="checksum mismatch")
        model_id = self.put_model(data)
        with self._lock:
            self.uploads.append(model_id)
        return msg.ModelResponse(status=msg.OK, message=model_id)


class _CombinerClient(rpc.CombinerClientServicer):
    def __init__(self, combiner: TestCombiner) -> None:
        self.c = combiner

    def Announce(self, request, context):  # noqa: N802 (gRPC method names)
        self.c._record(self.c.announces, request)
        if request.type == "VersionCheck":
            answer = {"success": True, "version": "test"}
            return msg.Response(response="compatible", parameters=json.dumps(answer))
        return msg.Response(response=f"{request.type} ok")

    def PollAndReportAsync(self, request, context):  # noqa: N802
        return self.c._poll(request)

    def SendModelUpdate(self, request, context):  # noqa: N802
        return self.c._record(self.c.updates, request)

    def SendModelValidation(self, request, context):  # noqa: N802
        return self.c._record(self.c.validations, request)

    def SendModelMetric(self, request, context):  # noqa: N802
        return self.c._record(self.c.metrics, request)

    def SendAttributeMessage(self, request, context):  # noqa: N802
        return self.c._record(self.c.attributes, request)

    def SendStatus(self, request, context):  # noqa: N802
        return self.c._record(self.c.statuses, request)

    def SendTelemetryMessage(self, request, context):  # noqa: N802
        return self.c._record(self.c.telemetry, request)

    def SendHeartbeat(self, request, context):  # noqa: N802
        return msg.Response(response="alive")


class _ModelService(rpc.ModelServiceServicer):
    def __init__(self, combiner: TestCombiner) -> None:
        self.c = combiner

    def Download(self, request, context):  # noqa: N802
        yield from self.c._download(request.model_id, context)

    def Upload(self, request_iterator, context):  # noqa: N802
        return self.c._upload(request_iterator, context)


def _make_http_handler(combiner: TestCombiner) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/api/v1/clients/add":
                self._reply(404, {"message": f"no route {self.path}"})
                return
            length = int(self.headers.get("Content-Length", 0))
            self._reply(200, combiner._register(json.loads(self.rfile.read(length))))

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_: object) -> None:  # keep pytest output quiet
            pass

    return Handler

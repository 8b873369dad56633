"""The loopback combiner's servers: the gRPC services and the one HTTP route a client calls.

The protocol they implement is described in :mod:`combiner`. The servicers subclass the
installed line's generated ``scaleout_pb2_grpc`` bases: methods for RPCs a line's proto lacks
(1.1's streams on 1.0.7) are never registered, so each line is served exactly its own proto.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import grpc
import scaleoututil.grpc.scaleout_pb2 as msg
import scaleoututil.grpc.scaleout_pb2_grpc as rpc
from scaleoututil.utils.model import ScaleoutModel

from combiner import Task, TestCombiner

CHUNK_SIZE = 64 * 1024


def field_of(message: Any, name: str) -> Any:
    """``message.name``, or None where this line's proto lacks the field or it is unset."""
    descriptor = message.DESCRIPTOR.fields_by_name.get(name)
    if descriptor is None or (descriptor.has_presence and not message.HasField(name)):
        return None
    return getattr(message, name)


class CombinerClient(rpc.CombinerClientServicer):
    """Tasks, reports and every side channel of ``CombinerClient`` in ``scaleout.proto``."""

    def __init__(self, combiner: TestCombiner) -> None:
        self.c = combiner

    def Announce(self, request, context):  # noqa: N802 (gRPC method names)
        self.c._record(self.c.announces, request)
        if request.type == "VersionCheck":
            answer = {"success": True, "version": "test"}
            return msg.Response(response="compatible", parameters=json.dumps(answer))
        return msg.Response(response=f"{request.type} ok")

    def PollAndReportAsync(self, request, context):  # noqa: N802
        return self._poll(request)

    def SendModelUpdate(self, request, context):  # noqa: N802
        return self.c._record(self.c.updates, request)

    def SendModelValidation(self, request, context):  # noqa: N802
        return self.c._record(self.c.validations, request)

    def SendModelMetric(self, request, context):  # noqa: N802
        return self.c._record(self.c.metrics, request)

    def SendStatus(self, request, context):  # noqa: N802
        return self.c._record(self.c.statuses, request)

    def SendHeartbeat(self, request, context):  # noqa: N802
        self.c._record(self.c.heartbeats, request)
        return msg.Response(response="alive")

    # 1.0.7 (and 1.1 with SCALEOUT_CLIENT_LEGACY_TELEMETRY=true): unary, string/float pairs.
    def SendAttributeMessage(self, request, context):  # noqa: N802
        return self.c._record(self.c.attributes, request)

    def SendTelemetryMessage(self, request, context):  # noqa: N802
        return self.c._record(self.c.telemetry, request)

    # 1.1: one record per key on a bidirectional stream, each acknowledged by its id.
    def StreamAttributeRecord(self, request_iterator, context):  # noqa: N802
        yield from self._acknowledge(request_iterator, self.c.attributes, "attribute_id")

    def StreamTelemetryRecord(self, request_iterator, context):  # noqa: N802
        yield from self._acknowledge(request_iterator, self.c.telemetry, "telemetry_id")

    def StreamInferenceResult(self, request_iterator, context):  # noqa: N802
        yield from self._acknowledge(request_iterator, self.c.inference_results, "inference_result_id")

    def SendBacklogReport(self, request, context):  # noqa: N802
        return self.c._record(self.c.backlog_reports, request)

    def _acknowledge(self, records: Iterator, into: list, id_field: str) -> Iterator[msg.RecordAck]:
        for record in records:
            record_id = getattr(record, id_field)
            if not record_id:
                self.c.protocol_errors.append(f"{type(record).__name__} without {id_field}")
            self.c._record(into, record)
            yield msg.RecordAck(record_ids=[record_id])

    # -- tasks -----------------------------------------------------------------------------

    def _poll(self, report: msg.ClientReport) -> msg.CombinerDirective:
        c, now = self.c, time.monotonic()
        with c._lock:
            c._polls[report.client_id] = c._polls.get(report.client_id, 0) + 1
            interval = field_of(report, "poll_interval_ms")
            if interval is not None:
                c.poll_intervals_ms.setdefault(report.client_id, set()).add(interval)
            directive = msg.CombinerDirective()
            for activity in report.reports:
                self._record_activity(report.client_id, activity, now, directive)
            accepts_new = not field_of(report, "skip_polling_tasks")  # 1.1: false while it restarts
            for task in c._tasks.values():
                if task.client_id != report.client_id or task.done:
                    continue
                if task.delivered_at is None and accepts_new:
                    directive.tasks.append(task.request)
                    task.delivered_at = now
                elif task.interrupt_requested and task.interrupt_delivered_at is None:
                    interrupt = msg.TaskRequest()
                    interrupt.CopyFrom(task.request)
                    interrupt.status = "INTERRUPTED"
                    directive.tasks.append(interrupt)
                    task.interrupt_delivered_at = now
            c._lock.notify_all()
        return directive

    def _record_activity(
        self, client_id: str, activity: msg.ActivityReport, now: float, directive: msg.CombinerDirective
    ) -> None:
        task = self.c._tasks.get(activity.correlation_id)
        if task is None:
            task = self._register_autonomous(client_id, activity, now, directive)
        if task is None:
            self.c.protocol_errors.append(f"report on unknown task {activity.correlation_id}")
            return
        if task.done:
            self.c.protocol_errors.append(f"second report on finished task {activity.correlation_id}")
        task.status = activity.status
        if activity.status not in task.seen_statuses:
            task.seen_statuses.append(activity.status)
        if activity.response:
            task.response = json.loads(activity.response)
        task.client_times = (field_of(activity, "started_at"), field_of(activity, "completed_at"))
        task.registration_reports += bool(field_of(activity, "command_type"))
        if activity.done and not task.done:
            task.done, task.finished_at = True, now

    def _register_autonomous(
        self, client_id: str, activity: msg.ActivityReport, now: float, directive: msg.CombinerDirective
    ) -> Task | None:
        """A task the client started itself (1.1): known from now on, acked by naming it back."""
        command_type = field_of(activity, "command_type")
        if not command_type:
            return None
        request = msg.TaskRequest(correlation_id=activity.correlation_id, type=command_type,
                                  data=field_of(activity, "parameters") or "", client_id=client_id,
                                  status="RUNNING")
        task = Task(request, delivered_at=now, autonomous=True)
        self.c._tasks[request.correlation_id] = task
        directive.tasks.append(request)
        return task


class ModelService(rpc.ModelServiceServicer):
    """Model ZIPs in ``FileChunk``\\ s, each direction checked against its checksum."""

    def __init__(self, combiner: TestCombiner) -> None:
        self.c = combiner

    def Download(self, request, context):  # noqa: N802
        data = self.c.model_bytes(request.model_id)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_id}")
        with ScaleoutModel.from_stream(io.BytesIO(data)) as model:
            context.set_trailing_metadata((("checksum", model.checksum),))
        for start in range(0, len(data), CHUNK_SIZE):
            yield msg.FileChunk(data=data[start : start + CHUNK_SIZE])

    def Upload(self, request_iterator, context):  # noqa: N802
        headers = dict(context.invocation_metadata())
        data = b"".join(chunk.data for chunk in request_iterator)
        with ScaleoutModel.from_stream(io.BytesIO(data)) as model:
            if model.model_id != headers.get("model-id"):
                return msg.ModelResponse(status=msg.FAILED, message="model-id header does not match the ZIP")
            if not model.verify_checksum(headers.get("checksum")):
                return msg.ModelResponse(status=msg.FAILED, message="checksum mismatch")
        return msg.ModelResponse(status=msg.OK, message=self.c._store_upload(data))


def make_http_handler(combiner: TestCombiner) -> type[BaseHTTPRequestHandler]:
    """``POST /api/v1/clients/add``: the assignment every ``scaleout client start`` asks for first;
    ``POST /api/v1/clients/enroll`` and ``/token``: 1.1's enrollment and its token refresh."""
    routes = {"/api/v1/clients/add": combiner._register, "/api/v1/clients/enroll": combiner._enroll,
              "/api/v1/clients/token": combiner._refresh}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            route = routes.get(self.path.rstrip("/"))
            if route is None:
                self._reply(404, {"message": f"no route {self.path}"})
                return
            length = int(self.headers.get("Content-Length", 0))
            self._reply(200, route(json.loads(self.rfile.read(length))))

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

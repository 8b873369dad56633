"""The callbacks in-process: a real ``scaleout.EdgeClient`` on a runtime that never connects.

The local federation (``simulate``), the demo, the benchmarks and the tests drive the exact
callbacks ``startup.py`` registers through the client's own ``EdgeClient``; only the transport
is replaced by :class:`LocalRuntime`, which records what a server would receive.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import scaleoututil.grpc.scaleout_pb2 as scaleout_msg
from scaleout import EdgeClient, ScaleoutModel
from scaleout.client.logging_context import LoggingContext
from scaleout.client.task_receiver import TaskReceiver

from . import edge
from .node import NodeConfig


def attributes_as_sent(attributes: dict) -> dict[str, Any]:
    """What a server reads from one ``log_attributes`` call on the installed client line.

    scaleout 1.1 sends one ``AttributeRecord`` per key whose payload is ``json.dumps({"value": v})``
    (a dict goes as itself), so the value arrives as it was; 1.0.7 sends one ``AttributeMessage``
    of string pairs, built here for real so that a non-string value raises TypeError as it does
    on a node. (1.1 raises TypeError for a value JSON cannot encode.)
    """
    if edge.ATTRIBUTE_RECORDS:
        return {key: json.loads(json.dumps(value)) for key, value in attributes.items()}
    message = scaleout_msg.AttributeMessage()
    for key, value in attributes.items():
        message.attributes.add(key=key, value=value)
    return {a.key: a.value for a in message.attributes}


class LocalRuntime:
    """An in-process ``EdgeClientRuntime`` (``scaleout/client/edge_client.py``) for both client lines.

    It has 1.0.7's methods and 1.1's additions (``set_client``, priorities, telemetry records,
    inference results, autonomous tasks, link quality). Metrics and attributes are built as the
    installed client builds them, so a value the line would reject is rejected here too.
    """

    def __init__(self) -> None:
        self.client: EdgeClient | None = None
        self.metrics: list[dict] = []
        self.attributes: list[dict] = []  # one dict per log_attributes call, as a server reads it
        self.telemetry: list[dict] = []  # {"key", "payload"} records
        self.inference_results: list[dict] = []
        self._priority_classes: dict[str, Any] = {}
        self._tasks = TaskReceiver(self, self._no_dispatch)  # runs autonomous tasks, answers aborts

    # -- identity (scaleout 1.1: EdgeClient hands itself over; TaskReceiver reads client_id) --

    def set_client(self, client: EdgeClient) -> None:
        self.client = client

    @property
    def client_id(self) -> str | None:
        return self.client.client_id if self.client is not None else None

    @property
    def link_quality(self) -> Any:
        """Always healthy: nothing in-process can lose a link."""
        from scaleoututil.queue import LinkQuality  # noqa: PLC0415 (scaleout 1.1 only)

        return LinkQuality.HEALTHY

    # -- what the callbacks report ---------------------------------------------------------

    def send_metric(self, metrics: dict, model_id: str, step: int, round_id: str, session_id: str) -> bool:
        message = scaleout_msg.ModelMetric(model_id=model_id, round_id=round_id, session_id=session_id)
        for key, value in metrics.items():
            message.metrics.add(key=key, value=value)  # numbers only; None becomes 0.0, as on a node
        self.metrics.append({"metrics": {e.key: e.value for e in message.metrics}, "model_id": model_id,
                             "step": step, "round_id": round_id})
        return True

    def send_attributes(self, attributes: dict, priority: str | None = None) -> bool:
        self.attributes.append(attributes_as_sent(attributes))
        return True

    def send_telemetry(self, key: Any = None, payload: dict | None = None, telemetry: dict | None = None,
                       priority: str | None = None) -> bool:
        """1.1's telemetry records; 1.0.7 (and 1.1's legacy form) pass a ``{key: value}`` dict."""
        if isinstance(key, dict):
            key, telemetry = None, key
        records = [(k, {"value": v, **(payload or {})}) for k, v in (telemetry or {}).items()]
        if key is not None:
            records.append((key, payload or {}))
        self.telemetry.extend({"key": k, "payload": json.loads(json.dumps(p))} for k, p in records)
        return bool(records)

    def send_inference_result(self, key: str, payload: dict, inference_id: str, model_id: str,
                              priority: str | None = None) -> bool:
        self.inference_results.append({"key": key, "payload": json.loads(json.dumps(payload)),
                                       "inference_id": inference_id, "model_id": model_id})
        return True

    # -- tasks ------------------------------------------------------------------------------

    def check_task_abort(self) -> None:
        self._tasks.check_abort()

    def get_current_task_id(self) -> str | None:
        task = self._tasks.get_current_task()
        return task.correlation_id if task is not None else None

    def start_autonomous_task(self, callback: Callable[[], Any], command_type: str, parameters: dict | None):
        """Run ``callback`` on its own thread as the client's TaskReceiver does; returns its Task."""
        return self._tasks.start_autonomous_task(callback, command_type, parameters)

    @staticmethod
    def _no_dispatch(request: Any) -> None:
        raise NotImplementedError("LocalRuntime receives no tasks from a server")

    # -- priority classes: kept, though nothing is ever queued in-process -------------------

    def list_priority_classes(self) -> list:
        return list(self._priority_classes.values())

    def add_priority_class(self, cls: Any) -> None:
        if cls.name in self._priority_classes:
            raise ValueError(f"class {cls.name!r} already exists")
        self._priority_classes[cls.name] = cls

    def remove_priority_class(self, name: str, force: bool = False) -> int:
        if self._priority_classes.pop(name, None) is None:
            raise KeyError(f"no priority class {name!r}")
        return 0  # records migrated: none are queued

    def replace_priority_class(self, cls: Any) -> None:
        if cls.name not in self._priority_classes:
            raise KeyError(f"no priority class {cls.name!r}")
        self._priority_classes[cls.name] = cls

    # -- the transport it does not have -----------------------------------------------------

    def get_model_from_combiner(self, model_id: str) -> ScaleoutModel:
        raise LookupError(f"model {model_id} is not available in-process")

    def connect_to_api(self, url, json=None, token=None, token_refresh_callback=None):
        raise NotImplementedError("LocalRuntime does not connect to a server")

    def init_grpchandler(self, config, token=None, url=None, token_refresh_callback=None) -> bool:
        raise NotImplementedError("LocalRuntime does not connect to a server")

    def run(self, with_heartbeat: bool = True, with_polling: bool = True) -> None:
        raise NotImplementedError("LocalRuntime has no event loop")

    def get_access_token(self) -> None:
        return None


def local_client(node: NodeConfig | str | Path, runtime: Any | None = None, workdir: str | Path | None = None):
    """A real ``scaleout.EdgeClient`` on ``runtime`` with this package's callbacks for ``node``
    (a data directory alone: a node serving it with the default limits, its ledger in the data).

    ``EdgeClient``'s constructor creates its model cache in the working directory (1.0.7:
    ``./.model_cache``, 1.1: ``./.scaleout/model_cache``), so it is constructed in ``workdir``
    (default: the node's data directory); nothing else depends on the working directory.
    """
    if not isinstance(node, NodeConfig):
        node = NodeConfig.for_data(node)
    with contextlib.chdir(workdir or node.data_dir):
        client = EdgeClient(runtime=runtime or LocalRuntime())
    edge.register(client, node)
    return client


def run_task(client: Any, task: str, *args: Any, model_id: str = "", round_id: str = "local") -> Any:
    """Call one registered callback the way the client does: inside a logging context."""
    callback = {"train": client.train_callback, "validate": client.validate_callback,
                "predict": client.inference_callback}[task]
    with client.logging_context(LoggingContext(model_id=model_id, round_id=round_id, session_id="local")):
        return callback(*args)

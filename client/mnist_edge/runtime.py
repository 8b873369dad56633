"""The callbacks in-process: a real ``scaleout.EdgeClient`` on a runtime that never connects.

The local federation (``simulate``), the demo, the benchmarks and the tests drive the exact
callbacks ``startup.py`` registers through the client's own ``EdgeClient``; only the transport
is replaced by :class:`LocalRuntime`, which records what the callbacks report.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from scaleout import EdgeClient, ScaleoutModel
from scaleout.client.logging_context import LoggingContext

from . import edge


class LocalRuntime:
    """An in-process ``EdgeClientRuntime``: records what the callbacks report, never connects.

    It lets the real ``EdgeClient`` (and so the exact callbacks ``startup.py`` registers) run
    without a server: the local federation, the demo and the tests all drive it.
    """

    def __init__(self) -> None:
        self.metrics: list[dict] = []
        self.attributes: list[dict] = []

    def send_metric(self, metrics: dict, model_id: str, step: int, round_id: str, session_id: str) -> bool:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
            raise TypeError(f"log_metric takes plain numbers only, got {metrics!r}")
        self.metrics.append({"metrics": dict(metrics), "model_id": model_id, "step": step, "round_id": round_id})
        return True

    def send_attributes(self, attributes: dict) -> bool:
        if not all(isinstance(v, str) for v in attributes.values()):
            raise TypeError(f"log_attributes takes string values only, got {attributes!r}")
        self.attributes.append(dict(attributes))
        return True

    def send_telemetry(self, telemetry: dict) -> bool:
        return True

    def check_task_abort(self) -> None:
        return None

    def get_model_from_combiner(self, model_id: str) -> ScaleoutModel:
        raise LookupError(f"model {model_id} is not available in-process")

    def connect_to_api(self, url, json=None, token=None, token_refresh_callback=None):
        raise NotImplementedError("LocalRuntime does not connect to a server")

    def init_grpchandler(self, config, token=None, url=None, token_refresh_callback=None) -> bool:
        raise NotImplementedError("LocalRuntime does not connect to a server")

    def run(self, with_heartbeat: bool = False, with_polling: bool = True) -> None:
        raise NotImplementedError("LocalRuntime has no event loop")

    def get_access_token(self) -> None:
        return None


def local_client(data_dir: str | Path, runtime: Any | None = None, workdir: str | Path | None = None):
    """A real ``scaleout.EdgeClient`` on ``runtime`` with this package's callbacks registered.

    ``EdgeClient`` creates ``./.model_cache``; it is made in ``workdir`` (default: ``data_dir``).
    """
    with contextlib.chdir(workdir or data_dir):
        client = EdgeClient(runtime=runtime or LocalRuntime())
    edge.register(client, Path(data_dir).resolve())
    return client


def run_task(client: Any, task: str, *args: Any, model_id: str = "", round_id: str = "local") -> Any:
    """Call one registered callback the way the client does: inside a logging context."""
    callback = {"train": client.train_callback, "validate": client.validate_callback,
                "predict": client.inference_callback}[task]
    with client.logging_context(LoggingContext(model_id=model_id, round_id=round_id, session_id="local")):
        return callback(*args)

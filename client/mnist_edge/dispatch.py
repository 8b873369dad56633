"""``python -m mnist_edge.dispatch startup|train|validate``: the dispatcher package's commands.

``scaleout client start --dispatcher`` (both client lines) runs ``entry_points.<name>.command``
of the dispatcher package (``dispatcher/scaleout.yaml``, assembled by ``make package-dispatcher``)
in a subprocess, in the package directory, inside the package's managed environment:

- ``startup`` once before the client connects; a non-zero exit stops the client.
- ``train IN OUT``: IN is the global model (the client's ZIP container), ``IN-metadata`` the
  round's ``client_settings`` as JSON. Write OUT (the numpyhelper npz, not a container: the
  client deletes OUT before it reads a container back) and ``OUT-metadata``, which the server
  gets as the update's ``training_metadata``.
- ``validate IN OUT``: write the metrics as JSON to OUT.

The client keeps nothing a command prints, and a non-zero exit reaches the server only as
"Train callback returned None model." (or a validation with no metrics). So a refused round
exits 0 with ``OUT-metadata`` ``{"num_examples": "<reason>"}``: the client then fails the task
with "... got: '<reason>'" before it uploads anything; a failed validation is sent as the
metrics ``{"validation_error": "<reason>"}``. The reasons are the ones the importer's callbacks
raise (``edge.EdgeTasks``), so the message rules (no image bytes) are theirs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import __version__, data, edge, files, hardware
from .errors import UserError
from .node import NodeConfig

log = logging.getLogger("mnist_edge")


class DispatchedClient:
    """What ``edge.EdgeTasks`` needs of a client, for a task with no channel back but the files.

    Metrics and attributes go to the client's output (stderr); nothing can abort the task.
    """

    def log_metric(self, metrics: dict[str, float]) -> bool:
        log.info("metric %s", json.dumps(metrics))
        return True

    def log_attributes(self, attributes: dict[str, Any]) -> bool:
        log.info("attributes %s", json.dumps(attributes))
        return True

    def check_task_abort(self) -> None:
        return None


def node_from(environ: Mapping[str, str]) -> NodeConfig:
    """The node, read from this command's environment (the client's, passed on). ``SCALEOUT_DATA_DIR``
    must be absolute: the command runs in the package directory, not where the operator started
    the client, so a relative path would name another place."""
    value = environ.get("SCALEOUT_DATA_DIR")
    if not value or not Path(value).is_absolute():
        raise data.DataError(
            f"SCALEOUT_DATA_DIR must be the absolute path of the node's data directory under "
            f"`scaleout client start --dispatcher` (its commands run in the package directory, not "
            f"where the client was started), got {value[:200] if value else value!r}")
    node = NodeConfig.from_environment(environ, Path.cwd(), hardware.cpu_count())
    hardware.configure_process(node.threads, environ)
    return node


def startup(node: NodeConfig) -> None:
    """Say which library and data directory the tasks will use; warn if there is nothing to train on."""
    log.info("mnist_edge %s from %s; data directory %s", __version__, Path(__file__).parent, node.data_dir)
    if not data.has_split(node.data_dir, "train"):
        log.warning("%s has no train/ split yet: training tasks will fail until shards are there", node.data_dir)


@contextlib.contextmanager
def computing(node: NodeConfig) -> Iterator[None]:
    """The compute lock, unless the client that started this command holds it already (scaleout 1.1
    takes it around the dispatched train and validate; 1.0.7 does not)."""
    if node.compute_lock is None:
        yield
        return
    with files.exclusive(node.compute_lock, holder_pids=files.flock_holders):
        yield


def tasks_for(environ: Mapping[str, str]) -> edge.EdgeTasks:
    return edge.EdgeTasks(DispatchedClient(), node_from(environ))


def train(environ: Mapping[str, str], inpath: Path, outpath: Path) -> None:
    metadata_path = Path(f"{outpath}-metadata")
    try:
        tasks = tasks_for(environ)
        settings = json.loads(Path(f"{inpath}-metadata").read_text())
        with computing(tasks.node), edge.ScaleoutModel.from_file(str(inpath)) as global_model:
            update, meta = tasks.train(global_model, settings)
        with update, update.get_training_model_stream() as npz:
            outpath.write_bytes(npz.read())
    except Exception as error:  # noqa: BLE001 (every refusal must reach the server, as in the importer)
        log.error("train refused: %s", error)
        metadata_path.write_text(json.dumps({"num_examples": str(error)[:1000]}))
        return
    # The dispatcher forwards only this file, as the update's training_metadata: the one shape.
    metadata_path.write_text(json.dumps(meta["training_metadata"]))


def validate(environ: Mapping[str, str], inpath: Path, outpath: Path) -> None:
    try:
        tasks = tasks_for(environ)
        with computing(tasks.node), edge.ScaleoutModel.from_file(str(inpath)) as global_model:
            metrics = tasks.validate(global_model)
    except Exception as error:  # noqa: BLE001
        log.error("validation failed: %s", error)
        metrics = {"validation_error": str(error)[:1000]}
    outpath.write_text(json.dumps(metrics))


def main(argv: list[str]) -> int:
    edge.configure_logging()
    command, paths = (argv[0] if argv else ""), [Path(p) for p in argv[1:]]
    if command not in ("startup", "train", "validate") or len(paths) != (0 if command == "startup" else 2):
        print("usage: python -m mnist_edge.dispatch startup | train IN OUT | validate IN OUT", file=sys.stderr)
        return 2
    if command == "train":
        train(os.environ, *paths)
    elif command == "validate":
        validate(os.environ, *paths)
    else:
        try:
            startup(node_from(os.environ))
        except UserError as error:
            log.error("%s", error)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

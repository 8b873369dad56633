"""Startup entry point: ``scaleout client start`` calls ``startup(client)`` once.

Everything is imported here, eagerly: once startup returns, ``client/`` is no longer on
``sys.path``, and the callbacks later run in the client's working directory.
"""

from mnist_edge import data, edge, ledger, model, privacy, settings, training  # noqa: F401  (eager imports)


def startup(client) -> None:
    # 1. Train, validate and predict callbacks read $SCALEOUT_DATA_DIR (default ./data).
    # 2. Each returns plain JSON values and checks client.check_task_abort() between batches.
    edge.register(client)

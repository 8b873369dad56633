"""Startup entry point: ``scaleout client start`` calls ``startup(client)`` once.

Everything is imported here, eagerly: once startup returns, ``client/`` is no longer on
``sys.path``, and the callbacks later run in the client's working directory.
"""

from mnist_edge import data, edge, ledger, model, privacy, settings, training  # noqa: F401  (eager imports)


def startup(client) -> None:
    # 1. The node's configuration is read once, here, from the environment (SCALEOUT_DATA_DIR,
    #    MNIST_EDGE_*; README "Environment variables").
    # 2. Train, validate and predict callbacks return plain JSON values and check
    #    client.check_task_abort() between batches.
    edge.register(client)

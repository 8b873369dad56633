"""Startup entry point: ``scaleout client start`` calls ``startup(client)`` once.

Everything is imported here, eagerly: once startup returns, ``client/`` is no longer on
``sys.path``, and the callbacks later run in the client's working directory.
"""

import os

# N clients on one box (``launch_clients`` sets TOTAL_N_CLIENTS): torch's idle OpenMP threads must
# sleep, not spin on cores the other clients compute on. OpenMP reads this once, when torch loads.
if os.environ.get("TOTAL_N_CLIENTS"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mnist_edge import data, edge, ledger, model, privacy, settings, training  # noqa: E402, F401  (eager imports)


def startup(client) -> None:
    # 1. The node's configuration is read once, here, from the environment (SCALEOUT_DATA_DIR,
    #    CLIENT_NUMBER/TOTAL_N_CLIENTS, MNIST_EDGE_*; README "Node settings").
    # 2. Train, validate, predict and the node_status command return plain JSON values and check
    #    client.check_task_abort() between batches.
    edge.register(client)

"""A whole federation on one machine: FedAvg over the prepared clients, no server, no network.

Every client is a real ``scaleout.EdgeClient`` on an in-process runtime with the callbacks
``startup.py`` registers (:func:`mnist_edge.runtime.local_client`), so what is simulated here is
exactly what a node runs. This module only plays the server: it picks clients, averages their
models weighted by ``num_examples``, and evaluates the global model on the clients' test splits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import container, data, hardware, ledger_store, model, privacy, runtime, training
from .aggregate import fedavg
from .errors import UserError
from .history import Round, row_text, write_outputs
from .node import DEFAULT_DELTA, LEDGER_NAME, NodeConfig
from .progress import track
from .settings import check_seed, parse_settings

NODES_DIR = "nodes"  # OUT/nodes/client-<i>/: each simulated node's working directory (its privacy ledger)


class SimulationError(UserError, ValueError):
    """The simulation cannot run as asked (no clients, bad round count, missing test split)."""


def find_clients(data_dir: Path) -> list[Path]:
    """``client-<i>`` directories of ``data_dir`` in numeric order; each must have a test split."""
    dirs = [p for p in data_dir.glob("client-*") if p.is_dir() and p.name[len("client-"):].isdigit()]
    dirs.sort(key=lambda p: int(p.name[len("client-"):]))
    if not dirs:
        raise SimulationError(
            f"{data_dir}: no client-<i> directories (run `python -m mnist_edge prepare` first)")
    for path in dirs:
        if not data.has_split(path, "test"):
            raise SimulationError(f"{path}: no test split (prepare with --test-fraction > 0)")
    return dirs


def round_seed(seed: int, round_index: int, client: int) -> int:
    """A client's training seed for one round: distinct per (seed, round, client), reproducible."""
    return int(np.random.SeedSequence([seed, round_index, client]).generate_state(1)[0] >> 1)


class Evaluator:
    """The global model on every client's test split; loads the splits once, reuses one CNN."""

    def __init__(self, client_dirs: list[Path]) -> None:
        self.tests = {p.name: data.load_split(p, "test") for p in client_dirs}
        self.net = model.Net()
        self.device = hardware.select_device()

    def __call__(self, params: list[np.ndarray]) -> tuple[float, float, dict[str, float]]:
        """(test loss, test accuracy) on the union, and each client's test accuracy."""
        model.set_parameters(self.net, params, "global model")
        loss_sum, correct, count, per_client = 0.0, 0.0, 0, {}
        for name, split in self.tests.items():
            loss, accuracy = training.evaluate(self.net, split.images, split.labels, self.device)
            loss_sum, correct = loss_sum + loss * len(split), correct + accuracy * len(split)
            count += len(split)
            per_client[name] = accuracy
        return loss_sum / count, correct / count, per_client


def simulate(
    data_dir: str | Path,
    rounds: int,
    out: str | Path,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    clients_per_round: int | None = None,
    seed: int = 0,
    init: str | Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    dp_settings: dict[str, float] | None = None,
    dp_budget: float | None = None,
    dp_delta: float | None = None,
    dp_rounds: int | None = None,
) -> list[Round]:
    """Run ``rounds`` FedAvg rounds over the clients in ``data_dir``; write the results to ``out``.

    The initial model is ``init`` (a seed/global ``.npz``) or the CNN initialised with ``seed``
    (seed 0 is exactly the ``seed.npz`` that ``build.py`` writes). ``dp_settings`` are the rounds'
    ``dp_*`` settings; ``dp_budget``/``dp_delta``/``dp_rounds`` are every node's ``MNIST_EDGE_DP_EPSILON``,
    ``_DELTA`` and ``_ROUNDS`` (default: ``rounds``, a budget planned for this federation). ``epochs``,
    ``batch_size`` and ``learning_rate`` left None are the round settings' defaults.
    A client whose budget refuses a round sits it out; when all do, the simulation stops.
    """
    if rounds < 1:
        raise SimulationError(f"--rounds must be >= 1, got {rounds}")
    check_seed(seed, "--seed")
    client_dirs = find_clients(Path(data_dir))
    per_round = len(client_dirs) if clients_per_round is None else clients_per_round
    if not 1 <= per_round <= len(client_dirs):
        raise SimulationError(
            f"--clients-per-round must be between 1 and {len(client_dirs)}, got {per_round}")
    given = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate}
    settings = {**{k: v for k, v in given.items() if v is not None}, **(dp_settings or {})}
    parse_settings(settings)  # a bad value fails now, not in round 1
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old_node in (out / NODES_DIR).glob("client-*"):
        ledger_store.remove(old_node / LEDGER_NAME)  # a new simulation is a new federation: nothing spent
    if dp_rounds is not None and dp_rounds < 1:
        raise SimulationError(f"--dp-rounds must be >= 1, got {dp_rounds}")
    nodes = [NodeConfig.for_data(p, epsilon=dp_budget, delta=DEFAULT_DELTA if dp_delta is None else dp_delta,
                                 rounds=rounds if dp_rounds is None else dp_rounds,
                                 ledger=(out / NODES_DIR / p.name / LEDGER_NAME).absolute()) for p in client_dirs]
    clients = [runtime.local_client(node, workdir=out) for node in nodes]
    params = model.load_npz(init) if init else model.get_parameters(model.new_model(seed))
    evaluate = Evaluator(client_dirs)
    picker = np.random.default_rng(seed)

    test_loss, test_accuracy, per_client = evaluate(params)
    history = [Round(0, [], None, test_loss, test_accuracy, 0.0, per_client)]
    echo(f"{len(clients)} clients, {per_round} per round, {rounds} rounds")
    echo(f"{'round':>5}  {'training_loss':>13}  {'test_accuracy':>13}  {'seconds':>7}")
    echo(row_text(history[0]))
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        chosen = sorted(picker.choice(len(clients), per_round, replace=False).tolist())
        outcome = train_round([(i, clients[i]) for i in chosen], params, settings, seed, r,
                              f"round {r}/{rounds}", progress)
        if outcome is None:
            echo(f"round {r}: every chosen client's privacy budget refused it; stopping")
            break
        params, training_loss, metas = outcome
        test_loss, test_accuracy, per_client = evaluate(params)
        private = [m for m in metas.values() if "dp_epsilon_spent" in m]
        history.append(Round(r, sorted(metas), training_loss, test_loss, test_accuracy,
                             time.perf_counter() - start, per_client,
                             max((m["dp_epsilon_round"] for m in private), default=None),
                             max((m["dp_epsilon_spent"] for m in private), default=None),
                             sorted(set(chosen) - set(metas))))
        echo(row_text(history[-1]))
    config = {"data": str(data_dir), "clients": len(clients), "clients_per_round": per_round,
              "rounds": rounds, **settings, "seed": seed, "init": None if init is None else str(init),
              "dp_budget": dp_budget, "dp_delta": dp_delta}
    write_outputs(out, history, params, config)
    return history


def train_round(
    chosen: list[tuple[int, Any]],
    params: list[np.ndarray],
    settings: dict[str, Any],
    seed: int,
    round_index: int,
    label: str,
    progress: bool,
) -> tuple[list[np.ndarray], float, dict[int, dict]] | None:
    """Each chosen client trains the global model through its train callback; FedAvg the results.

    A client whose privacy budget refuses the round sits it out. Returns the new global parameters, the clients'
    training loss weighted by ``num_examples`` (NaN if a client's loss was not finite) and each client's train
    metadata; None when every client refused.
    """
    global_model = container.to_scaleout_model(params)
    results, loss_sum, metas = [], 0.0, {}
    for i, client in track(chosen, len(chosen), label, "clients", progress):
        client_settings = {**settings, "seed": round_seed(seed, round_index, i)}
        try:
            local, meta = runtime.run_task(
                client,
                "train",
                global_model,
                client_settings,
                model_id=global_model.model_id,
                round_id=str(round_index),
            )
        except privacy.BudgetExceeded:
            continue
        except training.TrainingDiverged as error:
            raise SimulationError(
                f"round {round_index}, client-{i}: {error}; the simulation stopped and wrote no model"
            ) from None
        metadata = meta["training_metadata"]
        n = int(metadata["num_examples"])
        results.append((container.params_from(local), n))
        loss_sum += n * (float("nan") if metadata["training_loss"] is None else metadata["training_loss"])
        metas[i] = metadata
    if not results:
        return None
    return fedavg(results), loss_sum / sum(n for _params, n in results), metas

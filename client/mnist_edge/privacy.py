"""Node-owned differential privacy: DP-SGD for one round (Opacus) under the node's own budget.

The budget is the data owner's, set on the node (``MNIST_EDGE_DP_EPSILON``, ``MNIST_EDGE_DP_DELTA``)
and never by a task. With a budget set every train task runs DP-SGD; the round is charged in the
ledger (:mod:`mnist_edge.ledger`) *before* its first batch, and a round that would pass the budget
fails before any training, so no update leaves the node. A round's ``dp_*`` settings can only add
noise: they decide σ and C, the node decides δ and the total ε.

Accounting is Opacus's RDP accountant with the sampling it assumes: Poisson sampling of each batch
with rate q = batch_size / n; σ for a ``dp_epsilon`` target comes from ``get_noise_multiplier``.
The training itself is :mod:`mnist_edge.dpsgd`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from . import dpsgd, ledger, training
from .dpsgd import RoundPlan
from .ledger import BudgetExceeded, LedgerError, PrivacyError  # noqa: F401  (the errors callers catch)
from .settings import TrainSettings

log = logging.getLogger("mnist_edge")
ENV_EPSILON = "MNIST_EDGE_DP_EPSILON"
ENV_DELTA = "MNIST_EDGE_DP_DELTA"
DEFAULT_DELTA = 1e-5
DEFAULT_NOISE_MULTIPLIER = 1.0
DEFAULT_MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class NodeBudget:
    """The data owner's limits: total ε (None: no budget) and δ."""

    epsilon: float | None
    delta: float = DEFAULT_DELTA

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NodeBudget:
        environ = os.environ if environ is None else environ
        epsilon = _env_number(environ, ENV_EPSILON, "a number > 0", lambda v: v > 0)
        delta = _env_number(environ, ENV_DELTA, "a number between 0 and 1 (exclusive)", lambda v: 0 < v < 1)
        return cls(epsilon, DEFAULT_DELTA if delta is None else delta)


@contextlib.contextmanager
def node_environment(epsilon: float | None, delta: float | None) -> Iterator[NodeBudget]:
    """This process's ``MNIST_EDGE_DP_*`` set as a node operator would (None: unset), restored after.

    For the local federation and the benchmarks, which play every node in one process.
    """
    wanted = {ENV_EPSILON: epsilon, ENV_DELTA: delta}
    saved = {name: os.environ.get(name) for name in wanted}
    try:
        for name, value in wanted.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = repr(float(value))
        yield NodeBudget.from_env()  # a bad value fails here, before any round
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _env_number(environ: Mapping[str, str], name: str, rule: str,
                ok: Callable[[float], bool]) -> float | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise PrivacyError(f"environment variable {name} must be {rule}, got {text!r}")
    return value


def steps_per_epoch(n: int, sample_rate: float) -> int:
    """Opacus's Poisson sampler draws 1/q batches per epoch (``UniformWithReplacementSampler``)."""
    return len(UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate))


def plan_round(settings: TrainSettings, n: int, budget: NodeBudget) -> RoundPlan | None:
    """The round's DP parameters, or None when DP is off (no node budget and no ``dp_*`` setting).

    σ is ``dp_noise_multiplier`` (default 1.0); with ``dp_epsilon`` Opacus computes the σ that
    reaches it at the node's δ, and when both are set the larger σ (more noise) wins.
    """
    if budget.epsilon is None and not settings.asks_for_dp:
        return None
    sample_rate = min(1.0, settings.batch_size / n)
    steps = settings.epochs * steps_per_epoch(n, sample_rate)
    sigma = settings.dp_noise_multiplier
    if settings.dp_epsilon is not None:
        try:
            target = get_noise_multiplier(target_epsilon=settings.dp_epsilon, target_delta=budget.delta,
                                          sample_rate=sample_rate, steps=steps, accountant="rdp")
        except ValueError:
            raise PrivacyError(f"setting 'dp_epsilon' {settings.dp_epsilon:g} cannot be reached at delta "
                               f"{budget.delta:g} with {steps} steps at sample rate {sample_rate:.4g}: "
                               "ask for a larger epsilon") from None
        sigma = max(sigma or 0.0, target)
    return RoundPlan(sigma or DEFAULT_NOISE_MULTIPLIER, settings.dp_max_grad_norm or DEFAULT_MAX_GRAD_NORM,
                     sample_rate, steps, budget.delta, min(settings.batch_size, n))


def default_ledger_path() -> Path:
    """The ledger lives in the client's working directory (the callbacks run there)."""
    return Path.cwd() / ledger.LEDGER_NAME


def round_metadata(record: ledger.Record) -> dict[str, float]:
    """The numbers a server needs to audit the round, as plain JSON numbers."""
    return {"dp_epsilon_round": record.epsilon_round, "dp_epsilon_spent": record.epsilon_total,
            "dp_delta": record.delta, "dp_noise_multiplier": record.noise_multiplier,
            "dp_max_grad_norm": record.max_grad_norm, "dp_sample_rate": record.sample_rate,
            "dp_steps": record.steps}


def train_round(
    net: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    settings: TrainSettings,
    *,
    model_id: str,
    data_fingerprint: str,
    ledger_path: str | Path | None = None,
    budget: NodeBudget | None = None,
    on_batch: Callable[[], None] | None = None,
    on_metrics: Callable[[training.Metrics], None] | None = None,
    device: torch.device | None = None,
) -> tuple[training.TrainResult, dict[str, float]]:
    """One round: plain :func:`training.train` when DP is off, else charge the ledger, then DP-SGD.

    Returns the result and the ``dp_*`` metadata (empty without DP). Raises
    :class:`BudgetExceeded` (nothing trained, nothing charged) or :class:`LedgerError`.
    """
    budget = budget or NodeBudget.from_env()
    plan = plan_round(settings, len(labels), budget)
    if plan is None:
        result = training.train(net, images, labels, settings, on_batch=on_batch, on_metrics=on_metrics,
                                device=device)
        return result, {}
    record = ledger.charge(ledger_path or default_ledger_path(), model_id=model_id,
                           data_fingerprint=data_fingerprint, noise_multiplier=plan.noise_multiplier,
                           max_grad_norm=plan.max_grad_norm, sample_rate=plan.sample_rate, steps=plan.steps,
                           delta=plan.delta, budget=budget.epsilon)
    budget_text = "no budget" if budget.epsilon is None else f"budget {budget.epsilon:g}"
    log.info("DP round charged: epsilon %.4f (sigma %.4g, C %g, q %.4g, %d steps, delta %g); spent %.4f, %s",
             record.epsilon_round, plan.noise_multiplier, plan.max_grad_norm, plan.sample_rate, plan.steps,
             plan.delta, record.epsilon_total, budget_text)
    result = dpsgd.train_private(net, images, labels, settings, plan, on_batch, on_metrics, device)
    return result, round_metadata(record)


# -- command line ---------------------------------------------------------------------------------


def add_dp_arguments(p: argparse.ArgumentParser) -> None:
    """``--dp-noise-multiplier``, ``--dp-max-grad-norm``, ``--dp-epsilon``: the round settings' names."""
    p.add_argument("--dp-noise-multiplier", type=float, metavar="SIGMA",
                   help=f"DP-SGD noise multiplier (default {DEFAULT_NOISE_MULTIPLIER} when DP runs)")
    p.add_argument("--dp-max-grad-norm", type=float, metavar="C",
                   help=f"per-sample gradient clip norm (default {DEFAULT_MAX_GRAD_NORM} when DP runs)")
    p.add_argument("--dp-epsilon", type=float, metavar="EPS", help="target epsilon of this run (sets sigma)")


def add_command(commands: argparse._SubParsersAction) -> None:
    """``python -m mnist_edge privacy [--ledger PATH]``: the charged rounds and what is left."""
    p = commands.add_parser("privacy", help="print this node's privacy ledger and remaining budget")
    p.add_argument("--ledger", type=Path, default=None,
                   help=f"ledger file (default ./{ledger.LEDGER_NAME}, in the client's working directory)")
    p.set_defaults(func=cmd_privacy)


def cmd_privacy(args: argparse.Namespace) -> int:
    budget = NodeBudget.from_env()
    print(ledger.describe(ledger.read(args.ledger or default_ledger_path()), budget.epsilon))
    return 0

"""Node-owned differential privacy: DP-SGD for one round (Opacus) under the node's own budget.

The budget is the data owner's, set on the node (:class:`mnist_edge.node.PrivacyLimits`, from
``MNIST_EDGE_DP_EPSILON`` and ``MNIST_EDGE_DP_DELTA``) and never by a task. With a budget set every train task runs DP-SGD; the round is charged in the
ledger (:mod:`mnist_edge.ledger`) *before* its first batch, and a round that would pass the budget
fails before any training, so no update leaves the node. A round's ``dp_*`` settings can only add
noise: they decide σ and C, the node decides δ and the total ε.

Accounting is Opacus's RDP accountant with the sampling it assumes: Poisson sampling of each batch
with rate q = batch_size / n; σ for a ``dp_epsilon`` target comes from ``get_noise_multiplier``.
The training itself is :mod:`mnist_edge.dpsgd`.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from . import dpsgd, ledger, training
from .dpsgd import RoundPlan
from .ledger import BudgetExceeded, LedgerError, PrivacyError  # noqa: F401  (the errors callers catch)
from .node import PrivacyLimits
from .settings import TrainSettings

log = logging.getLogger("mnist_edge")
DEFAULT_NOISE_MULTIPLIER = 1.0
DEFAULT_MAX_GRAD_NORM = 1.0
MAX_NOISE = 10_000.0
"""Largest σ·C a round may add (the settings' largest σ times their largest C): noise finite in float32."""


def steps_per_epoch(n: int, sample_rate: float) -> int:
    """Opacus's Poisson sampler draws 1/q batches per epoch (``UniformWithReplacementSampler``)."""
    return len(UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate))


def plan_round(settings: TrainSettings, n: int, budget: PrivacyLimits) -> RoundPlan | None:
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
    plan = RoundPlan(sigma or DEFAULT_NOISE_MULTIPLIER, settings.dp_max_grad_norm or DEFAULT_MAX_GRAD_NORM,
                     sample_rate, steps, budget.delta, min(settings.batch_size, n))
    _check_accountable(plan, "dp_epsilon" if settings.dp_epsilon is not None else "dp_noise_multiplier")
    return plan


def _check_accountable(plan: RoundPlan, source: str) -> None:
    """PrivacyError, before anything is charged, unless the accountant gives this round a finite ε
    and a step's noise σ·C is finite and at most :data:`MAX_NOISE`; ``source`` is the setting σ came from."""
    noise = plan.noise_multiplier * plan.max_grad_norm
    try:
        with warnings.catch_warnings():  # "optimal order is the smallest/largest alpha": a looser ε, still a bound
            warnings.simplefilter("ignore", UserWarning)
            eps = ledger.epsilon(ledger.round_rdp(plan.noise_multiplier, plan.sample_rate, plan.steps), plan.delta)
    except (ArithmeticError, ValueError):
        eps = math.nan
    given = f"noise multiplier {plan.noise_multiplier:.4g} (from setting {source!r}) with 'dp_max_grad_norm' " \
            f"{plan.max_grad_norm:.4g}"
    if not math.isfinite(eps):
        raise PrivacyError(f"{given}: the accountant cannot bound this round's epsilon "
                           f"(sample rate {plan.sample_rate:.4g}, {plan.steps} steps); nothing was charged")
    if not noise <= MAX_NOISE:
        raise PrivacyError(f"{given}: a step's noise sigma*C would be {noise:.4g}, more than {MAX_NOISE:g}; "
                           "nothing was charged")


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
    plan: RoundPlan,
    limits: PrivacyLimits,
    *,
    model_id: str,
    data_fingerprint: str,
    on_batch: training.Hook = None,
    on_metrics: training.MetricsHook = None,
    device: torch.device | None = None,
) -> tuple[training.TrainResult, dict[str, float]]:
    """One DP round as ``plan`` says: charge the ledger first, then DP-SGD.

    Returns the result and the ``dp_*`` metadata. Raises :class:`BudgetExceeded` (nothing trained,
    nothing charged) or :class:`LedgerError`.
    """
    if limits.ledger is None:
        raise PrivacyError("no privacy ledger to charge, so no DP round can run: name one with "
                           "MNIST_EDGE_DP_LEDGER (or --ledger), a file that persists between runs")
    record = ledger.charge(limits.ledger, model_id=model_id, data_fingerprint=data_fingerprint,
                           noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                           sample_rate=plan.sample_rate, steps=plan.steps, delta=plan.delta, budget=limits.epsilon)
    budget_text = "no budget" if limits.epsilon is None else f"budget {limits.epsilon:g}"
    log.info("DP round charged: epsilon %.4f (sigma %.4g, C %g, q %.4g, %d steps, delta %g); spent %.4f, %s",
             record.epsilon_round, plan.noise_multiplier, plan.max_grad_norm, plan.sample_rate, plan.steps,
             plan.delta, record.epsilon_total, budget_text)
    result = dpsgd.train_private(net, images, labels, settings, plan, on_batch, on_metrics, device)
    return result, round_metadata(record)


def describe(limits: PrivacyLimits) -> str:
    """The node's ledger and what is left of its budget: what ``python -m mnist_edge privacy`` prints."""
    if limits.ledger is None:
        return "no privacy ledger configured"
    return ledger.describe(ledger.read(limits.ledger), limits.epsilon)

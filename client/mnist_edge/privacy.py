"""Node-owned differential privacy: DP-SGD for one round (Opacus) under the node's own budget.

The budget is the data owner's, set on the node (:class:`mnist_edge.node.PrivacyLimits`, from
``MNIST_EDGE_DP_EPSILON`` and ``MNIST_EDGE_DP_DELTA``) and never by a task. With a budget set
every train task runs DP-SGD; the round is charged in the ledger (:mod:`mnist_edge.ledger`)
*before* its first batch, and a round that would pass the budget, or whose charge the disk does
not take in full, fails before any training, so no update leaves the node. A round's ``dp_*``
settings can only add noise: they decide σ and C (within bounds where the accounting stays
finite), the node decides δ (below 1/n) and the total ε.

A budget is planned: the node serves ``MNIST_EDGE_DP_ROUNDS`` DP rounds, and before each one σ is
the least noise that lets this round and every planned round after it fit what the ledger has
left (:mod:`mnist_edge.dpplan`). A round may ask for more noise, never get less. How a DP round
trains is the node's unless the round says otherwise: :data:`DP_ROUND_DEFAULTS` and
:data:`DEFAULT_MAX_GRAD_NORM` (plain SGD at a learning rate that shrinks as σ grows,
:data:`DP_STEP_NOISE`; a small clip, large Poisson batches), with
:data:`mnist_edge.dpsgd.FROZEN` layers kept and dropout off; ``bench/privacy.py`` measured each.

Accounting is Opacus's RDP accountant with the sampling it assumes: Poisson sampling of each batch
with rate q = batch_size / n; σ for a ``dp_epsilon`` target comes from ``get_noise_multiplier``.
The training itself is :mod:`mnist_edge.dpsgd`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings

import numpy as np
import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from . import dpplan, dpsgd, ledger, training
from .dpsgd import RoundPlan
from .ledger import BudgetExceeded, ChargeFailed, LedgerError, PrivacyError  # noqa: F401  (the errors callers catch)
from .node import PrivacyLimits
from .settings import DP_RANGES, DP_ROUND_DEFAULTS, TrainSettings

log = logging.getLogger("mnist_edge")
DEFAULT_NOISE_MULTIPLIER = 1.0
"""σ of a round a task asks for on a node with no budget to plan from."""
DEFAULT_MAX_GRAD_NORM = 0.1
DP_STEP_NOISE = 27.0
"""learning rate x σ of a DP round that does not set its learning rate: lr = min(20, 27 / σ), so the
noise a step adds to each weight (lr·σ·C/B) is the same at every budget; ``bench/privacy.py``
found the best lr at 4 for ε 1 (σ 6.7) and 10 for ε 3 (σ 2.7) over 10 rounds, both lr·σ ≈ 27."""
# Where Opacus's accountant and the clip stay finite and quick (σ 1e-300 divides by zero, 1e308
# overflows; σ·C is the noise's scale): the round settings' bounds, checked again for a plan built
# without parse_settings and for the σ a ``dp_epsilon`` target asks for.
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = DP_RANGES["dp_noise_multiplier"]
MIN_MAX_GRAD_NORM, MAX_MAX_GRAD_NORM = DP_RANGES["dp_max_grad_norm"]
MAX_NOISE = 10_000.0
"""Largest σ·C a round may add (the settings' largest σ times their largest C): noise finite in float32."""


def steps_per_epoch(n: int, sample_rate: float) -> int:
    """Opacus's Poisson sampler draws 1/q batches per epoch (``UniformWithReplacementSampler``)."""
    return len(UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate))


def check_delta(delta: float, n: int) -> None:
    """δ must be below 1/n (refused) and should be below 1/(10 n) (warned): a (0, 1/n)-DP mechanism may
    publish one random image in the clear."""
    if delta >= 1.0 / n:
        raise PrivacyError(
            f"MNIST_EDGE_DP_DELTA {delta:g} is not below 1/n = {1.0 / n:g} for this node's n = {n} training "
            "images: with such a delta the guarantee allows publishing an image in the clear; refused before "
            f"charging. Set MNIST_EDGE_DP_DELTA below 1/(10 n) = {0.1 / n:g}")
    if delta > 0.1 / n:
        log.warning("MNIST_EDGE_DP_DELTA %g is above 1/(10 n) = %g for this node's n = %d training images: "
                    "a delta well below 1/n is what the guarantee needs", delta, 0.1 / n, n)


def _bounded(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise PrivacyError(f"setting {name!r} {value:g} is outside [{low:g}, {high:g}], where the accountant "
                           "and the clip stay finite; refused before charging")


def dp_round_settings(settings: TrainSettings) -> TrainSettings:
    """``settings`` with :data:`DP_ROUND_DEFAULTS` for every key the round did not set itself."""
    return dataclasses.replace(settings, **{k: v for k, v in DP_ROUND_DEFAULTS.items() if k not in settings.given})


def plan_round(settings: TrainSettings, n: int, budget: PrivacyLimits) -> RoundPlan | None:
    """The round's DP parameters, or None when DP is off (no node budget and no ``dp_*`` setting).

    With a budget σ is planned (:func:`planned_sigma`); without one it is ``dp_noise_multiplier``
    (default 1.0). With ``dp_epsilon`` Opacus computes the σ that reaches it at the node's δ; the
    largest σ (most noise) wins. Refused (:class:`PrivacyError`, before anything is charged): δ >=
    1/n, a σ or C outside its bounds, a round the accountant cannot give a finite ε for, a budget
    with no planned round left or too little left for them.
    """
    if budget.epsilon is None and not settings.asks_for_dp:
        return None
    check_delta(budget.delta, n)
    _bounded("dp_noise_multiplier", settings.dp_noise_multiplier, MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER)
    _bounded("dp_max_grad_norm", settings.dp_max_grad_norm, MIN_MAX_GRAD_NORM, MAX_MAX_GRAD_NORM)
    settings = dp_round_settings(settings)
    sample_rate = min(1.0, settings.batch_size / n)
    steps = settings.epochs * steps_per_epoch(n, sample_rate)
    sigma, rounds_left, source = settings.dp_noise_multiplier, None, "dp_noise_multiplier"
    if budget.epsilon is not None:
        planned, rounds_left = planned_sigma(budget, sample_rate, steps)
        if sigma is None or planned > sigma:
            sigma, source = planned, "the node's budget plan"
    if settings.dp_epsilon is not None:
        try:
            target = get_noise_multiplier(target_epsilon=settings.dp_epsilon, target_delta=budget.delta,
                                          sample_rate=sample_rate, steps=steps, accountant="rdp")
        except ValueError:
            raise PrivacyError(f"setting 'dp_epsilon' {settings.dp_epsilon:g} cannot be reached at delta "
                               f"{budget.delta:g} with {steps} steps at sample rate {sample_rate:.4g}: "
                               "ask for a larger epsilon") from None
        if target > MAX_NOISE_MULTIPLIER:
            raise PrivacyError(f"setting 'dp_epsilon' {settings.dp_epsilon:g} needs sigma {target:.4g}, above the "
                               f"largest dp_noise_multiplier {MAX_NOISE_MULTIPLIER:g}: ask for a larger epsilon")
        if sigma is None or target > sigma:
            sigma, source = target, "dp_epsilon"
    sigma = sigma or DEFAULT_NOISE_MULTIPLIER
    if "learning_rate" not in settings.given:
        settings = dataclasses.replace(settings, learning_rate=min(settings.learning_rate, DP_STEP_NOISE / sigma))
    plan = RoundPlan(sigma, settings.dp_max_grad_norm or DEFAULT_MAX_GRAD_NORM,
                     sample_rate, steps, budget.delta, min(settings.batch_size, n), settings, rounds_left)
    ledger.round_rdp(plan.noise_multiplier, plan.sample_rate, plan.steps)  # finite, or refused; cached for the charge
    _check_accountable(plan, source)
    return plan


def planned_sigma(budget: PrivacyLimits, sample_rate: float, steps: int) -> tuple[float, int]:
    """The σ that lets the node's planned rounds left fit its budget, and the rounds left after this one.

    The ledger says what is spent and how many rounds were charged; with none of the planned
    ``budget.rounds`` left, or too little budget for them, the round is refused naming the variables.
    """
    found = ledger.read(budget.ledger) if budget.ledger is not None else None
    charged = 0 if found is None else found.count
    left = dpplan.rounds_left(budget.rounds, charged)
    spent_rdp = np.zeros(len(ledger.ORDERS)) if found is None else found.rdp_total
    try:
        sigma = dpplan.plan_sigma(budget=budget.epsilon, delta=budget.delta, spent_rdp=spent_rdp, rounds=left,
                                  sample_rate=sample_rate, steps=steps)
    except dpplan.PlanError as error:
        raise BudgetExceeded(f"{error}; this node planned {budget.rounds} DP round(s) "
                             f"(MNIST_EDGE_DP_ROUNDS) and has charged {charged}") from None
    if sigma > MAX_NOISE_MULTIPLIER:
        raise BudgetExceeded(f"the {left} planned DP round(s) left need sigma {sigma:.4g} to fit the budget epsilon "
                             f"{budget.epsilon:g}, above the largest {MAX_NOISE_MULTIPLIER:g}: the budget is spent")
    return max(sigma, MIN_NOISE_MULTIPLIER), left - 1


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


def round_metadata(charged: ledger.Charged, rounds_left: int | None = None) -> dict[str, float | int | str]:
    """The numbers a server needs to audit the round, as plain JSON values.

    ``dp_rounds_left``: the node's planned DP rounds left after this one (only with a budget).

    ``dp_ledger_records`` and ``dp_ledger_head`` (the sha256 of this round's record) are the
    ledger's head after the charge: a server that sees a node's count or ``dp_epsilon_spent`` go
    back has seen its ledger rolled back.
    """
    record = charged.record
    left = {} if rounds_left is None else {"dp_rounds_left": rounds_left}
    return {**left, "dp_epsilon_round": record.epsilon_round, "dp_epsilon_spent": record.epsilon_total,
            "dp_delta": record.delta, "dp_noise_multiplier": record.noise_multiplier,
            "dp_max_grad_norm": record.max_grad_norm, "dp_sample_rate": record.sample_rate,
            "dp_steps": record.steps, "dp_ledger_records": charged.records, "dp_ledger_head": charged.head}


def train_round(
    net: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    plan: RoundPlan,
    limits: PrivacyLimits,
    *,
    model_id: str,
    data_fingerprint: str,
    on_batch: training.Hook = None,
    on_metrics: training.MetricsHook = None,
    device: torch.device | None = None,
) -> tuple[training.TrainResult, dict[str, float]]:
    """One DP round as ``plan`` says (its settings included): charge the ledger first, then DP-SGD.

    Returns the result and the ``dp_*`` metadata. Raises :class:`BudgetExceeded` (nothing trained,
    nothing charged), :class:`ChargeFailed` (the disk refused the record: nothing trained) or
    :class:`LedgerError`.
    """
    if limits.ledger is None:
        raise PrivacyError("no privacy ledger to charge, so no DP round can run: name one with "
                           "MNIST_EDGE_DP_LEDGER (or --ledger), a file that persists between runs")
    charged = ledger.charge(limits.ledger, model_id=model_id, data_fingerprint=data_fingerprint,
                           noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                           sample_rate=plan.sample_rate, steps=plan.steps, delta=plan.delta, budget=limits.epsilon)
    record = charged.record
    budget_text = "no budget" if limits.epsilon is None else f"budget {limits.epsilon:g}"
    log.info("DP round charged: epsilon %.4f (sigma %.4g, C %g, q %.4g, %d steps, delta %g); spent %.4f, %s",
             record.epsilon_round, plan.noise_multiplier, plan.max_grad_norm, plan.sample_rate, plan.steps,
             plan.delta, record.epsilon_total, budget_text)
    result = dpsgd.train_private(net, images, labels, plan, on_batch, on_metrics, device)
    return result, round_metadata(charged, plan.rounds_left)


def describe(limits: PrivacyLimits, full: bool = False) -> str:
    """The node's ledger and what is left of its budget: what ``python -m mnist_edge privacy`` prints.

    ``full``: recompute every record's ε instead of starting from the head's checkpoint.
    """
    if limits.ledger is None:
        return "no privacy ledger configured"
    found = ledger.read(limits.ledger, full=full)
    lines = [f"privacy ledger {found.path}: {len(found.records)} charged round(s)"]
    if found.records:
        lines.append(f"{'time':<25} {'model_id':<36} {'sigma':>7} {'C':>6} {'q':>8} {'steps':>6} "
                     f"{'eps_round':>9} {'eps_total':>9}")
        for r in found.records:
            lines.append(f"{r.time:<25} {r.model_id[:36]:<36} {r.noise_multiplier:>7.4g} "
                         f"{r.max_grad_norm:>6.3g} {r.sample_rate:>8.4g} {r.steps:>6} "
                         f"{r.epsilon_round:>9.4f} {r.epsilon_total:>9.4f}")
        lines.append(f"delta {found.delta:g}; epsilon spent {found.spent:.4f}; head {found.last_hash[:16]}... "
                     f"(epsilon recomputed for {found.recomputed} record(s), the rest from the head's checkpoint)")
    if limits.epsilon is None:
        lines.append("budget: none (MNIST_EDGE_DP_EPSILON is not set): DP runs only when a round asks for it")
    else:
        left = dpplan.rounds_left(limits.rounds, found.count)
        lines.append(f"budget epsilon {limits.epsilon:g}; remaining {max(limits.epsilon - found.spent, 0.0):.4f}; "
                     f"planned DP rounds left: {left} of {limits.rounds} (MNIST_EDGE_DP_ROUNDS)")
    return "\n".join(lines)

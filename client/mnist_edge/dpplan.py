"""How much noise a DP round needs so that the node's planned rounds fit its budget.

A node with only a budget (``MNIST_EDGE_DP_EPSILON``) serves a planned number of DP rounds
(``MNIST_EDGE_DP_ROUNDS``). Before each round it asks :func:`plan_sigma` for the smallest σ
such that this round and every planned round after it, all at that σ, compose with what the
ledger already holds to at most the budget. The arithmetic is the ledger's own
(:func:`accounting.round_rdp`, :func:`accounting.epsilon`: rounds add their RDP curves), so a planned
round is never refused by the ledger. Re-planning before every round spends what an earlier
noisier round left over; a round may ask for more noise than planned (``max``), never less.
"""

from __future__ import annotations

import math

import numpy as np

from . import accounting

RELATIVE_TOLERANCE = 1e-4
"""σ is found to this relative precision, always on the side that fits the budget."""
FIT_MARGIN = 1e-9
"""The planned total stays this far (relative) below the budget: the ledger sums the rounds' curves
one by one, in another order than ``spent + k * curve``, and may round the last bit the other way."""
MAX_SIGMA = 1e6


class PlanError(ValueError):
    """No σ makes the planned rounds fit: the budget is spent, or no round is left in the plan."""


def rounds_left(planned: int, charged: int) -> int:
    """Planned rounds not yet charged (0 when the plan is served)."""
    return max(planned - charged, 0)


def planned_epsilon(spent_rdp: np.ndarray, sigma: float, sample_rate: float, steps: int, rounds: int,
                    delta: float) -> float:
    """ε at ``delta`` after ``rounds`` more rounds at ``sigma`` on top of ``spent_rdp``."""
    return accounting.epsilon(spent_rdp + rounds * accounting.round_rdp(sigma, sample_rate, steps), delta)


def plan_sigma(*, budget: float, delta: float, spent_rdp: np.ndarray, rounds: int, sample_rate: float,
               steps: int) -> float:
    """The smallest σ (to :data:`RELATIVE_TOLERANCE`, rounded up) for which ``rounds`` more rounds
    of ``steps`` Poisson-sampled steps at ``sample_rate`` fit ``budget`` on top of ``spent_rdp``.

    Raises :class:`PlanError` when ``rounds`` < 1 or even σ = 1e6 does not fit (budget spent).
    """
    if rounds < 1:
        raise PlanError(f"no planned DP round is left (budget epsilon {budget:g}); raise MNIST_EDGE_DP_ROUNDS "
                        "only together with a budget that covers the new rounds")
    limit = budget * (1 - FIT_MARGIN)

    def fits(sigma: float) -> bool:
        eps = planned_epsilon(spent_rdp, sigma, sample_rate, steps, rounds, delta)
        return math.isfinite(eps) and eps <= limit

    high = 1.0
    while not fits(high):
        high *= 2
        if high > MAX_SIGMA:
            spent = accounting.epsilon(spent_rdp, delta)
            raise PlanError(f"privacy budget epsilon {budget:g} cannot cover {rounds} more round(s): "
                            f"{spent:.4f} is spent already")
    low = high / 2
    while low > 0 and fits(low):  # σ < 1: halve until it no longer fits
        high, low = low, low / 2
    while high - low > RELATIVE_TOLERANCE * high:
        middle = (low + high) / 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return high


def round_sigma(planned: float, asked: float | None) -> float:
    """The σ a round runs at: the plan's, or the round's own if it asks for more noise."""
    return planned if asked is None else max(planned, asked)

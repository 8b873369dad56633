"""The privacy arithmetic the ledger and the planner share: Opacus's RDP accountant, one round at a time.

A round of ``steps`` Poisson-sampled steps at rate q with noise σ has an RDP curve over Opacus's
orders; rounds compose by adding curves, and ε at δ is read off the composed curve. A σ the
accountant cannot count (it divides by σ² and exponentiates: 1e-300 and 1e308 fail) is refused
naming ``dp_noise_multiplier``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from .ledger_store import PrivacyError

ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=256)
def _rdp(noise_multiplier: float, sample_rate: float, steps: int) -> tuple[float, ...]:
    """The RDP curve of one round (cached: planning computes it first, and rounds repeat their settings)."""
    try:
        curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps,
                                         orders=ORDERS)
    except (ArithmeticError, ValueError):  # Opacus divides by σ² and exponentiates: 1e-300 and 1e308 fail
        curve = [math.inf]
    values = tuple(np.atleast_1d(curve).tolist())
    if not all(math.isfinite(v) for v in values):
        raise PrivacyError(f"dp_noise_multiplier {noise_multiplier:g} cannot be accounted at sample rate "
                           f"{sample_rate:g} over {steps} steps: the accountant gives no finite epsilon")
    return values


def round_rdp(noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    return np.asarray(_rdp(float(noise_multiplier), float(sample_rate), int(steps)))


def epsilon(rdp_curve: np.ndarray, delta: float) -> float:
    """ε at ``delta`` of a composed RDP curve (what ``RDPAccountant.get_epsilon`` returns)."""
    if not np.any(rdp_curve):
        return 0.0
    eps, _order = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp_curve, delta=delta)
    return float(eps)

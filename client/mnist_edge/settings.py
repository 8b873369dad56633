"""Round settings (the server's ``client_settings``): defaults, types, ranges, upper bounds, unknown keys.

A typo in a round's settings should fail that round on every node with a message naming the
key, not silently train with a default. The upper bounds keep what a server can ask of a node
bounded (time: ``epochs``; memory: ``batch_size``, ~0.5 MB of activations per image; a finite,
sane step: ``learning_rate``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import UserError

OPTIMIZERS = ("adadelta", "sgd", "adam")
PRECISIONS = ("auto", "fp32", "bf16")
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 1024
MAX_LEARNING_RATE = 1000.0
SEED_LIMIT = 2**63
"""Seeds are 0 <= seed < 2**63 (what torch and numpy generators both take)."""
_SHOWN_CHARS = 40
DP_SETTINGS = ("dp_noise_multiplier", "dp_max_grad_norm", "dp_epsilon")
# A round cannot set the node's own privacy limits: naming them is refused with the variable to use.
MAX_DP_EPSILON = 100.0  # a round's target epsilon; far past any meaningful guarantee already
DP_RANGES = {"dp_noise_multiplier": (1e-6, 100.0), "dp_max_grad_norm": (1e-6, 100.0),
             "dp_epsilon": (0.0, MAX_DP_EPSILON)}
"""Each ``dp_*`` setting's (exclusive low or inclusive low, high). σ and C within these keep Opacus's RDP
accountant finite (σ = 1e-200 divides by zero there, 1e200 overflows), and σ·C at most 10,000 keeps a
step's noise finite in float32 (σ = 1e154 would charge ε = 0 and then fill the weights with inf)."""
DP_ROUND_DEFAULTS = {"optimizer": "sgd", "learning_rate": 20.0, "batch_size": 200}
"""What a DP round trains with where the round's settings do not say (``bench/privacy.py --ideas``):
plain SGD (noise swamps an adaptive optimizer's second moments) and large Poisson batches. The
learning rate is the largest: a noisier round takes a smaller one (``privacy.DP_STEP_NOISE``)."""
NODE_OWNED = {"dp_delta": "MNIST_EDGE_DP_DELTA", "dp_budget": "MNIST_EDGE_DP_EPSILON"}


class SettingsError(UserError, ValueError):
    """A round setting has an unknown key, a wrong type or a value out of range."""


@dataclass(frozen=True)
class TrainSettings:
    """Local training settings for one round; defaults are the PyTorch MNIST example's."""

    epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 1.0
    optimizer: str = "adadelta"
    seed: int | None = None
    precision: str = "auto"
    # Differential privacy (see privacy.py): None means "not set by the round".
    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float | None = None
    dp_epsilon: float | None = None
    # The keys the round set itself: a DP round takes the node's DP defaults for the others (privacy.py).
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @property
    def asks_for_dp(self) -> bool:
        """True when the round sets any ``dp_*`` setting."""
        return any(getattr(self, key) is not None for key in DP_SETTINGS)

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "given"}


_RULES: dict[str, str] = {
    "epochs": f"an integer from 1 to {MAX_EPOCHS}",
    "batch_size": f"an integer from 1 to {MAX_BATCH_SIZE}",
    "learning_rate": f"a number > 0 and <= {MAX_LEARNING_RATE:g}",
    "optimizer": "one of " + ", ".join(OPTIMIZERS),
    "seed": "an integer from 0 to 2**63-1",
    "precision": "one of " + ", ".join(PRECISIONS),
    "dp_noise_multiplier": "a number from {:g} to {:g}".format(*DP_RANGES["dp_noise_multiplier"]),
    "dp_max_grad_norm": "a number from {:g} to {:g}".format(*DP_RANGES["dp_max_grad_norm"]),
    "dp_epsilon": f"a number > 0 and <= {MAX_DP_EPSILON:g}",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid(key: str, value: Any) -> bool:
    if key == "epochs":
        return _is_int(value) and 1 <= value <= MAX_EPOCHS
    if key == "batch_size":
        return _is_int(value) and 1 <= value <= MAX_BATCH_SIZE
    if key == "learning_rate":  # compared before float(): 10**400 has no float
        return (_is_int(value) or isinstance(value, float)) and 0 < value <= MAX_LEARNING_RATE
    if key in DP_SETTINGS:
        low, high = DP_RANGES[key]
        if not (_is_int(value) or isinstance(value, float)):
            return False
        return (value > low if low == 0 else value >= low) and value <= high
    if key == "optimizer":
        return isinstance(value, str) and value.lower() in OPTIMIZERS
    if key == "precision":
        return isinstance(value, str) and value.lower() in PRECISIONS
    if key == "seed":
        return is_seed(value)
    raise AssertionError(key)


def is_seed(value: Any) -> bool:
    """An integer 0 <= seed < 2**63: what torch and numpy generators both take."""
    return _is_int(value) and 0 <= value < SEED_LIMIT


def check_seed(value: Any, name: str) -> int:
    """``value`` if it is a seed, else :class:`SettingsError` naming ``name`` (a flag or a setting)."""
    if not is_seed(value):
        raise SettingsError(f"{name} must be {_RULES['seed']}, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """``value`` for a message, cut to about 40 characters; a long string is cut before its repr is made."""
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        return f"{repr(value[:_SHOWN_CHARS])[:_SHOWN_CHARS]}... ({len(value) + 2} characters)"
    if not isinstance(value, str | int | float | bool | type(None)):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(text)} characters)"


def parse_settings(raw: Mapping[str, Any] | None) -> TrainSettings:
    """Validate ``raw`` and fill in defaults; raise :class:`SettingsError` naming the key."""
    if raw is not None and not isinstance(raw, Mapping):
        raise SettingsError(f"client_settings must be a mapping of setting names to values, got {type(raw).__name__}")
    raw = dict(raw or {})
    owned = sorted(set(raw) & set(NODE_OWNED))
    if owned:
        raise SettingsError(f"setting {owned[0]!r} is the node's own limit ({NODE_OWNED[owned[0]]} on the node); "
                            "a round cannot set it")
    known = [f.name for f in fields(TrainSettings) if f.name != "given"]
    unknown = sorted(_shown(key) for key in raw if key not in known)
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]}; accepted settings are: {', '.join(known)}")
    for key, value in raw.items():
        if value is None and (key == "seed" or key in DP_SETTINGS):
            continue
        if not _valid(key, value):
            raise SettingsError(f"setting {key!r} must be {_RULES[key]}, got {_shown(value)}")
    normalized = {k: (v.lower() if isinstance(v, str) else v) for k, v in raw.items()}
    for key in ("learning_rate", *DP_SETTINGS):
        if normalized.get(key) is not None:
            normalized[key] = float(normalized[key])
    return TrainSettings(**normalized, given=frozenset(normalized))


def capped_batch_size(settings: TrainSettings, num_examples: int) -> TrainSettings:
    """``settings`` with ``batch_size`` at most the number of examples (a bigger batch is the whole set)."""
    if 0 < num_examples < settings.batch_size:
        return dataclasses.replace(settings, batch_size=num_examples)
    return settings

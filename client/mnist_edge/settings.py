"""Round settings (the server's ``client_settings``): defaults, types, ranges, upper bounds, unknown keys.

A typo in a round's settings should fail that round on every node with a message naming the
key, not silently train with a default. The upper bounds keep what a server can ask of a node
bounded (time: ``epochs``; memory: ``batch_size``, ~0.5 MB of activations per image; a finite,
sane step: ``learning_rate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

OPTIMIZERS = ("adadelta", "sgd", "adam")
PRECISIONS = ("auto", "fp32", "bf16")
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 1024
MAX_LEARNING_RATE = 1000.0
SEED_LIMIT = 2**63
"""Seeds are 0 <= seed < 2**63 (what torch and numpy generators both take)."""
_SHOWN_CHARS = 40


class SettingsError(ValueError):
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_RULES: dict[str, str] = {
    "epochs": f"an integer from 1 to {MAX_EPOCHS}",
    "batch_size": f"an integer from 1 to {MAX_BATCH_SIZE}",
    "learning_rate": f"a number > 0 and <= {MAX_LEARNING_RATE:g}",
    "optimizer": "one of " + ", ".join(OPTIMIZERS),
    "seed": "an integer from 0 to 2**63-1",
    "precision": "one of " + ", ".join(PRECISIONS),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid(key: str, value: Any) -> bool:
    if key == "epochs":
        return _is_int(value) and 1 <= value <= MAX_EPOCHS
    if key == "batch_size":
        return _is_int(value) and 1 <= value <= MAX_BATCH_SIZE
    if key == "learning_rate":  # compared before float(): an int like 10**400 has no float
        return (_is_int(value) or isinstance(value, float)) and 0 < value <= MAX_LEARNING_RATE
    if key == "optimizer":
        return isinstance(value, str) and value.lower() in OPTIMIZERS
    if key == "precision":
        return isinstance(value, str) and value.lower() in PRECISIONS
    if key == "seed":
        return _is_int(value) and 0 <= value < SEED_LIMIT
    raise AssertionError(key)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(text)} characters)"


def parse_settings(raw: Mapping[str, Any] | None) -> TrainSettings:
    """Validate ``raw`` and fill in defaults; raise :class:`SettingsError` naming the key."""
    if raw is not None and not isinstance(raw, Mapping):
        raise SettingsError(f"client_settings must be a mapping of setting names to values, got {type(raw).__name__}")
    raw = dict(raw or {})
    known = [f.name for f in fields(TrainSettings)]
    unknown = sorted(_shown(key) for key in raw if key not in known)
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]}; accepted settings are: {', '.join(known)}")
    for key, value in raw.items():
        if key == "seed" and value is None:
            continue
        if not _valid(key, value):
            raise SettingsError(f"setting {key!r} must be {_RULES[key]}, got {_shown(value)}")
    normalized = {k: (v.lower() if isinstance(v, str) else v) for k, v in raw.items()}
    if "learning_rate" in normalized:
        normalized["learning_rate"] = float(normalized["learning_rate"])
    return TrainSettings(**normalized)


def capped_batch_size(settings: TrainSettings, num_examples: int) -> TrainSettings:
    """``settings`` with ``batch_size`` at most the number of examples (a bigger batch is the whole set)."""
    if 0 < num_examples < settings.batch_size:
        return dataclasses.replace(settings, batch_size=num_examples)
    return settings

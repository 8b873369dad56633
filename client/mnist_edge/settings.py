"""Round settings (the server's ``client_settings``): defaults, types, ranges, unknown keys.

A typo in a round's settings should fail that round on every node with a message naming the
key, not silently train with a default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

OPTIMIZERS = ("adadelta", "sgd", "adam")
PRECISIONS = ("auto", "fp32", "bf16")


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
    "epochs": "an integer >= 1",
    "batch_size": "an integer >= 1",
    "learning_rate": "a number > 0",
    "optimizer": "one of " + ", ".join(OPTIMIZERS),
    "seed": "an integer",
    "precision": "one of " + ", ".join(PRECISIONS),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid(key: str, value: Any) -> bool:
    if key in ("epochs", "batch_size"):
        return _is_int(value) and value >= 1
    if key == "learning_rate":
        return (_is_int(value) or isinstance(value, float)) and value > 0 and value != float("inf")
    if key == "optimizer":
        return isinstance(value, str) and value.lower() in OPTIMIZERS
    if key == "precision":
        return isinstance(value, str) and value.lower() in PRECISIONS
    if key == "seed":
        return _is_int(value)
    raise AssertionError(key)


def parse_settings(raw: Mapping[str, Any] | None) -> TrainSettings:
    """Validate ``raw`` and fill in defaults; raise :class:`SettingsError` naming the key."""
    raw = dict(raw or {})
    known = [f.name for f in fields(TrainSettings)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SettingsError(
            f"unknown setting {unknown[0]!r}; accepted settings are: {', '.join(known)}"
        )
    for key, value in raw.items():
        if key == "seed" and value is None:
            continue
        if not _valid(key, value):
            raise SettingsError(f"setting {key!r} must be {_RULES[key]}, got {value!r}")
    normalized = {k: (v.lower() if isinstance(v, str) else v) for k, v in raw.items()}
    if "learning_rate" in normalized:
        normalized["learning_rate"] = float(normalized["learning_rate"])
    return TrainSettings(**normalized)

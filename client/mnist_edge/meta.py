"""The xData meta file beside a model (``<stem>.xdata-meta.json``): its keys, reading, writing, checks.

A data platform reads this file to know what a model is (``model_kind``, ``model_state``,
``round``) and what it came from; ``train`` writes it, ``aggregate`` reads its members' and writes
its own. Metas come from files nobody checked, so reading is bounded (size, nesting) and every
value used is validated with the file and key named.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import atomic_write

MODEL_KIND = "mnist"
SUFFIX = ".xdata-meta.json"
MAX_BYTES = 1 << 20
"""Largest meta file read: 1 MiB (a meta is a few KB; a set of parents a few hundred bytes each)."""
MAX_NUM_EXAMPLES = 1_000_000_000
"""Largest ``num_examples`` a meta may claim: FedAvg weights by it, so one member cannot outweigh all."""
MAX_ROUND = 1_000_000_000


class MetaError(UserError, ValueError):
    """A meta file is unreadable or holds a value this package cannot use; the message names file and key."""


def meta_path(model_path: Path) -> Path:
    """``<dir>/<stem>.xdata-meta.json``: the metadata file the data platform reads beside a model."""
    return model_path.with_name(model_path.stem + SUFFIX)


def shown(value: Any, limit: int = 60) -> str:
    """``value`` as JSON for an error message, cut to ``limit`` characters (metas are untrusted)."""
    try:
        text = json.dumps(value, default=str)
    except (ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def read(path: Path) -> dict[str, Any]:
    """A meta file as a dict; anything else (too big, too deep, not a JSON object) fails naming the file."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as error:
        raise MetaError(f"{path}: cannot read meta file ({error.strerror or error})") from None
    if len(raw) > MAX_BYTES:
        raise MetaError(f"{path}: meta file larger than {MAX_BYTES:,} bytes")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise MetaError(f"{path}: meta file nests too deeply to be a meta") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise MetaError(f"{path}: not a readable JSON meta file ({str(error)[:80]})") from None
    if not isinstance(meta, dict):
        raise MetaError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def write(path: Path, meta: dict[str, Any]) -> Path:
    """Write ``meta`` atomically (a reader sees the old meta or the new one)."""
    text = json.dumps(meta, indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda handle: handle.write(text))


def count(meta: dict[str, Any], key: str, source: Path, limit: int, default: int | None = None) -> int:
    """``meta[key]`` as an integer from 1 to ``limit`` (``default`` when absent, if given), or an error."""
    if key not in meta and default is not None:
        return default
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        found = "no such key" if key not in meta else f"got {shown(value)}"
        raise MetaError(f"{source}: '{key}' must be an integer from 1 to {limit:,} ({found})")
    return value


def num_examples(meta: dict[str, Any], source: Path) -> int:
    return count(meta, "num_examples", source, MAX_NUM_EXAMPLES)


def round_of(meta: dict[str, Any], source: Path) -> int:
    """A model's ``round`` (a meta without one counts as round 1)."""
    return count(meta, "round", source, MAX_ROUND, default=1)


def next_round(init: Path | None) -> int:
    """The ``round`` of a model trained from ``init``: one more than the init's, 1 from fresh weights
    or from a file with no meta beside it (a seed)."""
    source = meta_path(init) if init is not None else None
    if source is None or not source.is_file():
        return 1
    return round_of(read(source), source) + 1


def now() -> str:
    """UTC, ISO 8601, to the second: ``created_at``."""
    return datetime.now(UTC).isoformat(timespec="seconds")

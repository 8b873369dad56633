"""What leaves a task: plain JSON values, and the training metadata in its one shape.

A train task's metadata is the same dict everywhere: the edge callback returns it as
``training_metadata`` (where the server reads ``num_examples`` to weight FedAvg), the dispatcher
entry point writes it beside the update, and standalone ``train`` writes it into the model's meta.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .data import Dataset
from .settings import TrainSettings
from .training import TrainResult


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars, paths and non-finite floats made plain JSON (NaN and inf: null)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # a path, an enum: its text


def training_metadata(result: TrainResult, settings: TrainSettings, requested: TrainSettings,
                      dataset: Dataset, privacy: Mapping[str, Any]) -> dict[str, Any]:
    """What one training run did, on what data, under which limits: plain JSON values.

    ``batch_size_requested`` appears when the requested batch was larger than the train split
    (``batch_size`` is then the split's size, the batch actually used).
    """
    metadata: dict[str, Any] = {
        "num_examples": result.num_examples,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "optimizer": settings.optimizer,
        "precision": result.precision,
        "seed": settings.seed,
        "training_loss": result.training_loss,
        "training_accuracy": result.training_accuracy,
        "rows_skipped": dataset.rows_skipped,
        "duplicate_image_ids": dataset.duplicate_image_ids,
        "data_fingerprint": dataset.fingerprint,
        **privacy,
    }
    if settings.batch_size != requested.batch_size:
        metadata["batch_size_requested"] = requested.batch_size
    return json_safe(metadata)

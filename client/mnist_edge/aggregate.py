"""FedAvg outside a federation: one model out of a ``model_set`` of trained models.

A data platform hands the module a directory of model directories (``mnist.pth`` plus
``mnist.xdata-meta.json`` each, as ``train`` writes them). The average is weighted by each
meta's ``num_examples``, so every member is checked before anything is averaged: its kind,
its example count (1 to ``meta.MAX_NUM_EXAMPLES``) and its parameters' shapes. A member,
its meta or its model that is a symbolic link is refused: the set is what the directory holds.
The output model and meta are checked before any work and each written atomically. The output
meta names its parents so the aggregated model can be traced back to the exact models and data
it came from.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import files, meta, model, remote
from .model import ModelFileError
from .standalone import DEFAULT_MODEL_NAME
from .storage import S3Config, is_s3_url


class ModelSetError(ModelFileError):
    """A model_set directory or one of its members cannot be aggregated."""


@dataclass
class Member:
    """One model of the set: its file and what its meta says about it."""

    directory: Path
    model_file: Path
    num_examples: int
    round: int
    data_fingerprint: str | None
    model_sha256: str


def fedavg(results: Iterable[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Average parameter lists weighted by each one's number of training examples.

    A running float64 sum: one list is held at a time, so a generator of results keeps
    memory flat however many models there are.
    """
    sums: list[np.ndarray] | None = None
    total = 0
    for params, n in results:
        weighted = [np.asarray(p, dtype=np.float64) * n for p in params]
        sums = weighted if sums is None else [s + w for s, w in zip(sums, weighted, strict=True)]
        total += n
    if sums is None:
        raise ValueError("fedavg: no models to average")
    return [(s / total).astype(np.float32) for s in sums]


def check_member(directory: Path) -> Member:
    """Check one model directory's meta; refuse it with the file and key at fault."""
    metas = sorted(directory.glob("*" + meta.SUFFIX))
    if len(metas) != 1:
        raise ModelSetError(f"{directory}: expected one *{meta.SUFFIX} beside the model, "
                            f"found {[m.name for m in metas][:5]}")
    meta_file = metas[0]
    _refuse_link(meta_file)
    record = meta.read(meta_file)
    if record.get("model_kind") != meta.MODEL_KIND:
        raise ModelSetError(f"{meta_file}: 'model_kind' must be {meta.shown(meta.MODEL_KIND)}, "
                            f"got {meta.shown(record.get('model_kind'))}")
    num_examples = meta.num_examples(record, meta_file)
    model_file = record.get("model_file", DEFAULT_MODEL_NAME)
    plain_name = isinstance(model_file, str) and Path(model_file).name == model_file
    if not plain_name or model_file in ("", ".", ".."):
        raise ModelSetError(f"{meta_file}: 'model_file' must be a file name inside {directory}, "
                            f"got {meta.shown(model_file)}")
    path = directory / model_file
    _refuse_link(path)
    if not path.is_file():
        raise ModelSetError(f"{path}: no such model file (named by {meta_file.name})")
    if path.stat().st_size > model.MAX_MODEL_BYTES:
        raise ModelSetError(f"{path}: {path.stat().st_size:,} bytes, more than a model of this CNN can be "
                            f"({model.MAX_MODEL_BYTES:,})")
    fingerprint = record.get("data_fingerprint")
    return Member(directory, path, num_examples, meta.round_of(record, meta_file),
                  fingerprint if isinstance(fingerprint, str) and len(fingerprint) <= 64 else None,
                  files.sha256_file(path))


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise ModelSetError(f"{path}: is a symbolic link; a member's meta and model must be files in its directory")


def find_members(model_set: Path) -> list[Path]:
    """The set's model directories in name order; a lone model or stray files are refused."""
    if not model_set.is_dir():
        raise ModelSetError(f"{model_set}: no such model_set directory")
    entries = sorted(p for p in model_set.iterdir() if not p.name.startswith("."))
    linked = [p.name for p in entries if p.is_symlink()]
    if linked:
        raise ModelSetError(f"{model_set}: member {meta.shown(linked[0])} is a symbolic link; a model_set holds "
                            "its models itself (a link could lead anywhere outside it)")
    stray = [p.name for p in entries if not p.is_dir()]
    if stray:
        hint = " (that is one model, not a model_set)" if any(s.endswith(meta.SUFFIX) for s in stray) else ""
        raise ModelSetError(f"{model_set}: expected only model directories, found files {stray[:5]}{hint}")
    if not entries:
        raise ModelSetError(f"{model_set}: empty model_set, expected one directory per model")
    return entries


def aggregate(model_set: str | Path, out: str | Path,
              store: S3Config | None = None) -> tuple[Path | list[str], dict[str, Any]]:
    """FedAvg the set into ``out`` (a ``.pth``, or ``mnist.pth`` in a directory; local or ``s3://``)
    with its meta. Returns the local model file (or, uploaded, what was written) and the meta."""
    with tempfile.TemporaryDirectory(prefix="mnist-edge-") as staging:
        target = remote.output(str(out), DEFAULT_MODEL_NAME, Path(staging))
        for path in (target, meta.meta_path(target)):  # before the work, not after it
            files.check_target(path)
        members = [check_member(p) for p in find_members(remote.model_set(str(model_set), Path(staging), store))]
        params = fedavg((model.load_model_file(m.model_file), m.num_examples) for m in members)
        existed = os.path.lexists(target)
        model.save_pth(params, target)
        record = {
            "model_kind": meta.MODEL_KIND,
            "model_state": "aggregated",
            "round": max(m.round for m in members),
            "model_file": target.name,
            "aggregation": "fedavg",
            "num_examples": sum(m.num_examples for m in members),
            "parents": [{"model": m.directory.name, "model_sha256": m.model_sha256,
                         "data_fingerprint": m.data_fingerprint, "num_examples": m.num_examples, "round": m.round}
                        for m in members],
            "created_at": meta.now(),
        }
        if is_s3_url(str(out)):
            return remote.publish(target, record, str(out), DEFAULT_MODEL_NAME, store), record
        try:
            meta.write(meta.meta_path(target), record)
        except BaseException:
            if not existed:  # no model without its meta (an older model, once replaced, cannot come back)
                target.unlink(missing_ok=True)
            raise
    return target, record

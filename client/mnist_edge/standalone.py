"""``train``, ``predict``, ``export``, ``import``: the same CNN and shards outside Scaleout.

A data platform's module or a pipeline step works with plain files: CSV shards in, a PyTorch
``.pth`` state_dict (plus ``<stem>.xdata-meta.json``) or a prediction CSV out. ``export`` and
``import`` move a model between the federation's ``.npz`` and plain PyTorch. The shard reader,
the settings rules and the training loops are the ones the edge callbacks use.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import data, model, paths, privacy, training
from .model import ModelFileError
from .progress import progress
from .settings import TrainSettings, capped_batch_size, parse_settings

MODEL_KIND = "mnist"
META_SUFFIX = ".xdata-meta.json"
DEFAULT_MODEL_NAME = "mnist.pth"
DEFAULT_RESULT_NAME = "result.csv"
_DESCRIBE = {"npz": "numpy .npz parameter file", "pth": "PyTorch .pth state_dict"}
_SUFFIXES = {"npz": (".npz",), "pth": (".pth", ".pt")}


def output_path(given: str, default_name: str) -> Path:
    """``given``, or ``given/default_name`` when it names a directory (a pipeline's ``/pfs/out``)."""
    path = Path(given)
    if path.is_dir() or given.endswith(("/", "\\")):
        return path / default_name
    return path


def meta_path(model_path: Path) -> Path:
    """``<dir>/<stem>.xdata-meta.json``: the metadata file the data platform reads beside a model."""
    return model_path.with_name(model_path.stem + META_SUFFIX)


def read_meta(path: Path) -> dict[str, Any]:
    """A meta file as a dict; one that is not a JSON object fails naming the file."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelFileError(f"{path}: not a readable JSON meta file ({error})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def shown(value: Any, limit: int = 60) -> str:
    """``value`` as JSON for an error message, cut to ``limit`` characters (metas are untrusted)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def meta_count(meta: dict[str, Any], key: str, source: Path, default: int | None = None) -> int:
    """``meta[key]`` as an integer >= 1 (``default`` when absent, if given), or an error naming both."""
    if key not in meta and default is not None:
        return default
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        found = "no such key" if key not in meta else f"got {shown(value)}"
        raise ModelFileError(f"{source}: '{key}' must be an integer >= 1 ({found})")
    return value


def lineage_round(init: str | None) -> int:
    """The ``round`` of a model trained from ``init``: one more than the init's (a meta without
    ``round`` counts as 1), and 1 from fresh weights or a file with no meta (a seed)."""
    source = meta_path(Path(init)) if init else None
    if source is None or not source.is_file():
        return 1
    return meta_count(read_meta(source), "round", source, default=1) + 1


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _save(params: list[np.ndarray], path: Path) -> Path:
    """``.npz`` (the federation's format) by name, a ``.pth`` state_dict otherwise."""
    return model.save_npz(params, path) if path.suffix.lower() == ".npz" else model.save_pth(params, path)


def cmd_train(args: argparse.Namespace) -> int:
    """Train the CNN on one dataset and write the model and its metadata."""
    flags = {f.name: getattr(args, f.name) for f in fields(TrainSettings)}
    requested = parse_settings({key: value for key, value in flags.items() if value is not None})
    out = output_path(args.model, DEFAULT_MODEL_NAME)
    for target in (out, meta_path(out)):  # before the training, not after it
        paths.check_target(target)
    net = model.new_model(requested.seed if requested.seed is not None else 0)
    if args.init:
        model.set_parameters(net, model.load_model_file(args.init), args.init)
    dataset = data.load_dataset(args.dataset, labels_required=True)
    settings = capped_batch_size(requested, len(dataset))
    batches = settings.epochs * math.ceil(len(dataset) / settings.batch_size)
    with progress(batches, "train", "batches") as bar:  # DP-SGD when the node has a budget or a --dp-* flag is given
        result, dp_metadata = privacy.train_round(
            net, dataset.images, dataset.labels, settings, model_id=args.init or "standalone",
            data_fingerprint=dataset.fingerprint, ledger_path=args.ledger, on_batch=bar.update,
            on_metrics=bar.set_postfix)
    _save(model.get_parameters(net), out)
    meta: dict[str, Any] = {
        "model_kind": MODEL_KIND,
        "model_state": "trained",
        "round": lineage_round(args.init),
        "model_file": out.name,
        "num_examples": result.num_examples,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        **({"batch_size_requested": requested.batch_size} if settings != requested else {}),
        "learning_rate": settings.learning_rate,
        "optimizer": settings.optimizer,
        "seed": settings.seed,
        "precision": result.precision,
        "init": args.init,
        "data_fingerprint": dataset.fingerprint,
        "rows_skipped": dataset.rows_skipped,
        "duplicate_image_ids": dataset.duplicate_image_ids,
        "training_loss": _finite(result.training_loss),
        "training_accuracy": _finite(result.training_accuracy),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **dp_metadata,
    }
    paths.atomic_write(meta_path(out), lambda handle: handle.write(json.dumps(meta, indent=2) + "\n"))
    print(f"trained {result.num_examples} images for {settings.epochs} epoch(s): "
          f"training_loss {result.training_loss:.4f}, training_accuracy {result.training_accuracy:.4f}"
          + (f" ({dataset.rows_skipped} rows skipped)" if dataset.rows_skipped else ""))
    print(f"wrote {out} and {meta_path(out)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict every row of a dataset into ``image_id,label,confidence`` CSV."""
    net = model.Net()
    model.set_parameters(net, model.load_model_file(args.model), args.model)
    dataset = data.load_dataset(args.dataset, labels_required=False)
    result = output_path(args.result, DEFAULT_RESULT_NAME)
    paths.refuse_inputs(result, dataset.files, "RESULT")
    paths.check_target(result)
    with progress(math.ceil(len(dataset) / training.EVAL_BATCH), "predict", "batches") as bar:
        predicted, confidence = training.predict(net, dataset.images, on_batch=bar.update)
    data.write_predictions(result, dataset.image_ids, predicted, confidence)
    print(f"predicted {len(predicted)} images into {result}"
          + (f" ({dataset.rows_skipped} rows skipped)" if dataset.rows_skipped else ""))
    labelled = dataset.labels != data.NO_LABEL
    if labelled.any():
        accuracy = float((predicted[labelled] == dataset.labels[labelled]).mean())
        print(f"accuracy {accuracy:.4f} on {int(labelled.sum())} labelled images")
    return 0


def convert(source: str, out: str, source_kind: str, out_kind: str, command: str) -> Path:
    """Read a model of ``source_kind``, write it as ``out_kind``; refuse the other way round."""
    kind = model.model_file_kind(source)
    if kind != source_kind:
        other = "import" if command == "export" else "export"
        raise ModelFileError(f"{source}: is a {_DESCRIBE[kind]}, '{command}' reads a "
                             f"{_DESCRIBE[source_kind]} ('{other}' converts the other way)")
    target = Path(out)
    if target.suffix.lower() in _SUFFIXES[source_kind]:
        raise ModelFileError(f"{target}: '{command}' writes a {_DESCRIBE[out_kind]}, "
                             f"not a {target.suffix} file")
    params = model.load_model_file(source)
    written = (model.save_pth if out_kind == "pth" else model.save_npz)(params, target)
    count = sum(p.size for p in params)
    print(f"wrote {written} ({_DESCRIBE[out_kind]}, {count:,} parameters) from {source}")
    return written


def cmd_export(args: argparse.Namespace) -> int:
    convert(args.source, args.out, "npz", "pth", "export")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    convert(args.source, args.out, "pth", "npz", "import")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``train``, ``predict``, ``export`` and ``import`` on the CLI's subparsers."""
    defaults = TrainSettings()
    p = commands.add_parser("train", help="train the CNN on a CSV shard or directory; write a .pth")
    p.add_argument("--model", required=True, metavar="OUT", help="model file to write (.pth; .npz for the "
                   f"federation), or an existing directory ({DEFAULT_MODEL_NAME} inside)")
    p.add_argument("--epochs", "--epoch", type=int, metavar="N",
                   help=f"passes over the data (default {defaults.epochs})")
    p.add_argument("--batch-size", type=int, metavar="B", help=f"default {defaults.batch_size}")
    p.add_argument("--learning-rate", type=float, metavar="L", help=f"default {defaults.learning_rate}")
    p.add_argument("--optimizer", metavar="O", help=f"adadelta, sgd or adam (default {defaults.optimizer})")
    p.add_argument("--seed", type=int, metavar="S",
                   help="fixes initial weights, shuffling and dropout (default: the seed model's weights)")
    p.add_argument("--precision", metavar="P", help=f"auto, fp32 or bf16 (default {defaults.precision})")
    p.add_argument("--init", metavar="MODEL", help="start from this .pth or .npz instead of fresh weights")
    privacy.add_dp_arguments(p)
    p.add_argument("--ledger", metavar="PATH", type=Path, default=None,
                   help="privacy ledger charged by DP training (default ./privacy-ledger.jsonl)")
    p.add_argument("dataset", metavar="DATASET", help="a CSV shard or a directory of shards")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("predict", help="predict a CSV shard or directory into image_id,label,confidence")
    p.add_argument("--model", required=True, help="a .pth state_dict or a seed/global .npz")
    p.add_argument("dataset", metavar="DATASET", help="a CSV shard or a directory of shards; labels optional")
    p.add_argument("result", metavar="RESULT", help=f"output CSV, or a directory ({DEFAULT_RESULT_NAME})")
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("export", help="federation .npz -> PyTorch .pth state_dict")
    p.add_argument("source", metavar="MODEL.npz")
    p.add_argument("out", metavar="OUT.pth")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("import", help="PyTorch .pth state_dict -> federation .npz")
    p.add_argument("source", metavar="MODEL.pth")
    p.add_argument("out", metavar="OUT.npz")
    p.set_defaults(func=cmd_import)

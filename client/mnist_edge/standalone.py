"""``train``, ``predict``, ``export``, ``import``: the same CNN and shards outside Scaleout.

A data platform's module or a pipeline step works with plain files: CSV shards in, a PyTorch
``.pth`` state_dict (plus ``<stem>.xdata-meta.json``) or a prediction CSV out. ``export`` and
``import`` move a model between the federation's ``.npz`` and plain PyTorch. The shard reader,
the settings rules and the training loops are the ones the edge callbacks use.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import data, distributed, files, hardware, meta, model, paths, privacy, remote, report, training
from .lineage import LocalFile
from .model import ModelFileError
from .node import PrivacyLimits, Ranks
from .progress import progress, say
from .settings import TrainSettings, capped_batch_size, parse_settings
from .storage import S3Config, is_s3_url

DEFAULT_MODEL_NAME = "mnist.pth"
DEFAULT_RESULT_NAME = "result.csv"
_DESCRIBE = {"npz": "numpy .npz parameter file", "pth": "PyTorch .pth state_dict"}
_SUFFIXES = {"npz": (".npz",), "pth": (".pth", ".pt")}
Echo = Callable[[str], None]


def output_path(given: str | Path, default_name: str) -> Path:
    """``given``, or ``given/default_name`` when it names a directory (a pipeline's ``/pfs/out``)."""
    path = Path(given)
    if path.is_dir() or str(given).endswith(("/", "\\")):
        return path / default_name
    return path


def dataset_directory(dataset: str | Path) -> Path:
    """The directory a dataset's shards are in (its privacy ledger lives there by default)."""
    path = Path(dataset).absolute()
    return path if path.is_dir() else path.parent


def save_model(params: list[np.ndarray], path: Path) -> Path:
    """``.npz`` (the federation's format) by name, a ``.pth`` state_dict otherwise."""
    return model.save_npz(params, path) if path.suffix.lower() == ".npz" else model.save_pth(params, path)


def train(dataset: str | Path, model_out: str | Path, settings: dict[str, Any], limits: PrivacyLimits,
          init: str | Path | None = None, echo: Echo = say, ranks: Ranks | None = None,
          store: S3Config | None = None) -> Path:
    """Train the CNN on one dataset; write the model and its meta (both atomically, or uploaded).

    ``dataset``, ``model_out`` and ``init`` are local paths or ``s3://`` URLs (``store`` says how
    to reach the bucket). With ``ranks`` (a data-parallel job: torchrun, a Kubeflow job) this
    process trains its part of the data under DDP (:mod:`mnist_edge.distributed`); rank 0 alone writes.
    """
    requested = parse_settings(settings)
    with tempfile.TemporaryDirectory(prefix="mnist-edge-") as staging:
        out = remote.output(str(model_out), DEFAULT_MODEL_NAME, Path(staging))
        for target in (out, meta.meta_path(out)):  # before the training, not after it
            files.check_target(target)
        init_path, init_sources = remote.model_file(str(init), Path(staging), store) if init else (None, [])
        net = model.new_model(requested.seed if requested.seed is not None else 0)
        if init_path is not None:
            model.set_parameters(net, model.load_model_file(init_path), str(init))
        shards = remote.dataset(str(dataset), Path(staging), store, ranks)
        if ranks is None:
            found = data.load_files(shards.files, shards.root)
            result, used, dp_metadata, whole, job = _train_here(net, found, requested, limits, init)
            sources = shards.sources(found.shard_sha256)
        else:
            result, used, whole, job, sources = _train_in_job(net, shards, requested, limits, ranks, echo)
            dp_metadata = {}
            if not ranks.writes:
                return out
        save_model(model.get_parameters(net), out)
        record = {
            "model_kind": meta.MODEL_KIND,
            "model_state": "trained",
            "round": meta.next_round(init_path),
            "model_file": out.name,
            "init": None if init is None else str(init),
            "created_at": meta.now(),
            **report.training_metadata(result, used, requested, whole, dp_metadata),
            **({"distributed": job} if job else {}),
            "lineage": remote.lineage_of(sources, whole.fingerprint, store, init_sources),
        }
        if not is_s3_url(str(model_out)):
            record["lineage"]["output"] = LocalFile.of(out).as_dict()
        meta.write(meta.meta_path(out), record)
        echo(f"trained {result.num_examples} images for {used.epochs} epoch(s): "
             f"training_loss {result.training_loss:.4f}, training_accuracy {result.training_accuracy:.4f}"
             + (f" ({whole.rows_skipped} rows skipped)" if whole.rows_skipped else ""))
        if is_s3_url(str(model_out)):
            for line in remote.publish(out, record, str(model_out), DEFAULT_MODEL_NAME, store):
                echo(line)
        else:
            echo(f"wrote {out} and {meta.meta_path(out)}")
    return out


def _train_here(net, found: data.Dataset, requested: TrainSettings, limits: PrivacyLimits, init):
    """One process: plain training, or DP-SGD when the node has a budget or a ``--dp-*`` flag asked."""
    used = capped_batch_size(requested, len(found))
    plan = privacy.plan_round(used, len(found), limits)
    batches = used.epochs * math.ceil(len(found) / used.batch_size) if plan is None else plan.steps
    with progress(batches, "train", "batches") as bar:
        hooks = {"on_batch": bar.update, "on_metrics": bar.set_postfix}
        if plan is None:
            return training.train(net, found.images, found.labels, used, **hooks), used, {}, found, None
        result, dp_metadata = privacy.train_round(net, found.images, found.labels, plan, limits,
                                                  model_id=str(init or "standalone"),
                                                  data_fingerprint=found.fingerprint, **hooks)
    return result, plan.settings, dp_metadata, found, None


def _train_in_job(net, shards: remote.Dataset, requested: TrainSettings, limits: PrivacyLimits, ranks: Ranks,
                  echo: Echo):
    """This rank's part of a data-parallel job; the result, the dataset and its inputs are the whole job's."""
    if limits.epsilon is not None or requested.asks_for_dp:
        raise privacy.PrivacyError("DP-SGD runs in one process: a node budget or a --dp-* flag cannot be used "
                                   f"in a data-parallel job (WORLD_SIZE {ranks.world_size}); train without torchrun")
    device = hardware.select_device()
    with distributed.process_group(ranks, device):
        mine, whole, job = distributed.load_part(shards.files, shards.root, ranks)
        used = capped_batch_size(requested, len(whole.image_ids))
        batches = used.epochs * math.ceil(len(mine) / max(1, -(-used.batch_size // ranks.world_size)))
        with progress(batches, f"train (rank {ranks.rank})", "batches", enabled=ranks.writes) as bar:
            result = distributed.train(net, mine, used, ranks, device, bar.update, bar.set_postfix)
        job["weights_sha256"] = distributed.check_same_weights(net, ranks)
        mine_files = distributed.part_of(shards.files, ranks).files
        read = {p.name: o for p, o in shards.remote.items() if p in mine_files}
        parts = distributed.gather(ranks, read, "collecting the lineage")
        everyone = {name: o for part in parts for name, o in part.items()}
    shards.remote.update({p: everyone[p.name] for p in shards.files if p.name in everyone})
    rows = job["ranks"][ranks.rank]
    echo(f"rank {ranks.rank} of {ranks.world_size}: trained on {rows['rows']} rows of {len(rows['files'])} "
         f"shard(s) (every {rows['stride']}. row from {rows['offset']}); weights sha256 {job['weights_sha256']}")
    return result, used, whole, job, shards.sources(whole.shard_sha256)


def predict(model_file: str | Path, dataset: str | Path, result: str | Path, echo: Echo = say,
            store: S3Config | None = None) -> Path:
    """Predict every row of a dataset into ``image_id,label,confidence`` CSV (local or ``s3://`` each)."""
    with tempfile.TemporaryDirectory(prefix="mnist-edge-") as staging:
        target = remote.output(str(result), DEFAULT_RESULT_NAME, Path(staging))
        files.check_target(target)
        local_model, _ = remote.model_file(str(model_file), Path(staging), store)
        net = model.Net()
        model.set_parameters(net, model.load_model_file(local_model), str(model_file))
        shards = remote.dataset(str(dataset), Path(staging), store)
        found = data.load_files(shards.files, shards.root, labels_required=False)
        paths.refuse_inputs(target, found.files, "RESULT")
        with progress(math.ceil(len(found) / training.EVAL_BATCH), "predict", "batches") as bar:
            predicted, confidence = training.predict(net, found.images, on_batch=bar.update)
        data.write_predictions(target, found.image_ids, predicted, confidence)
        if is_s3_url(str(result)):
            echo(f"uploaded {remote.publish_file(target, str(result), DEFAULT_RESULT_NAME, store)}")
        echo(f"predicted {len(predicted)} images into {result if is_s3_url(str(result)) else target}"
             + (f" ({found.rows_skipped} rows skipped)" if found.rows_skipped else ""))
        labelled = found.labels != data.NO_LABEL
        if labelled.any():
            accuracy = float((predicted[labelled] == found.labels[labelled]).mean())
            echo(f"accuracy {accuracy:.4f} on {int(labelled.sum())} labelled images")
    return target


def convert(source: str | Path, out: str | Path, out_kind: str, echo: Echo = say) -> Path:
    """``export`` (npz -> pth) and ``import`` (pth -> npz); refuse a file of the other kind."""
    source_kind = "npz" if out_kind == "pth" else "pth"
    command = "export" if out_kind == "pth" else "import"
    kind = model.model_file_kind(source)
    if kind != source_kind:
        other = "import" if command == "export" else "export"
        raise ModelFileError(f"{source}: is a {_DESCRIBE[kind]}, '{command}' reads a "
                             f"{_DESCRIBE[source_kind]} ('{other}' converts the other way)")
    target = Path(out)
    if target.suffix.lower() in _SUFFIXES[source_kind]:
        raise ModelFileError(f"{target}: '{command}' writes a {_DESCRIBE[out_kind]}, not a {target.suffix} file")
    params = model.load_model_file(source)
    written = (model.save_pth if out_kind == "pth" else model.save_npz)(params, target)
    echo(f"wrote {written} ({_DESCRIBE[out_kind]}, {sum(p.size for p in params):,} parameters) from {source}")
    return written

"""Where the standalone commands read and write: local paths, or ``s3://`` objects staged locally.

An ``s3://`` input is listed, then downloaded into a staging directory (a data-parallel rank
fetches only its own shards), and remembered as the exact object read (bucket, key, size, ETag,
version id) for the model's lineage; an ``s3://`` output is written locally, then uploaded with
its meta (:func:`transfer.upload_model`: nothing partial is left in the bucket). The commands
themselves (``standalone``, ``aggregate``) only ever see local files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data, lineage, transfer
from .lineage import LocalFile
from .node import Ranks
from .storage import S3Config, S3Object, is_s3_url, output_location, parse_s3_url


@dataclass
class Dataset:
    """A dataset's shard files as local paths (staged if remote), and what each one is."""

    root: Path
    files: list[Path]
    remote: dict[Path, S3Object] = field(default_factory=dict)  # staged path -> the object it came from

    def sources(self, sha256: tuple[str, ...] | list[str]) -> list[S3Object | LocalFile]:
        """The lineage inputs, given each file's sha256 (as the shard reader computed them)."""
        return [self.remote[p] if p in self.remote else LocalFile.of(p, h) for p, h in zip(self.files, sha256)]


def dataset(location: str, staging: Path, config: S3Config | None, ranks: Ranks | None = None) -> Dataset:
    """The shards at ``location``; from a bucket, only those this rank reads are downloaded."""
    if not is_s3_url(location):
        return Dataset(Path(location), data.shard_files(location))
    url, config = parse_s3_url(location), _config(config)
    if url.key.lower().endswith(".csv"):
        prefix = url.key.rsplit("/", 1)[0] + "/" if "/" in url.key else ""
        objects = [transfer.head(url, config)]
    else:
        prefix, objects = url.folder, transfer.list_objects(location, config, depth=1, suffixes=(".csv",))
    root = staging / "dataset"
    remote = {transfer.stage_path(root, o, prefix): o for o in objects}
    paths = sorted(remote)
    wanted = paths
    if ranks is not None:
        from .distributed import part_of  # noqa: PLC0415 (torch.distributed only for a data-parallel job)

        wanted = part_of(paths, ranks).files
    for staged in transfer.download([remote[p] for p in wanted], root, config, prefix):
        remote[staged.path] = staged.source  # what the GET returned: its version id, its sha256
    return Dataset(root, paths, remote)


def _config(config: S3Config | None) -> S3Config:
    if config is None:
        raise ValueError("an s3:// location needs the object store's configuration")
    return config


def model_file(location: str, staging: Path, config: S3Config | None) -> tuple[Path, list[S3Object | LocalFile]]:
    """A model to read (``--init``, ``predict --model``): local, or downloaded with its meta beside it."""
    if not is_s3_url(location):
        return Path(location), []
    model, meta = transfer.download_model(location, staging / "init", _config(config))
    return model.path, [model.source] + ([meta.source] if meta is not None else [])


def model_set(location: str, staging: Path, config: S3Config | None) -> Path:
    """A model_set directory for ``aggregate``: local, or every ``<member>/<file>`` downloaded."""
    if not is_s3_url(location):
        return Path(location)
    transfer.download_model_set(location, staging / "model_set", _config(config))
    return staging / "model_set"


def output(location: str, default_name: str, staging: Path) -> Path:
    """Where to write an output locally: ``location`` itself, or a staging file for an ``s3://`` one."""
    if not is_s3_url(location):
        from .standalone import output_path  # noqa: PLC0415 (standalone uses this module)

        return output_path(location, default_name)
    return staging / "out" / Path(output_location(location, default_name).key).name


def publish(local_model: Path, record: dict[str, Any], location: str, default_name: str,
            config: S3Config | None) -> list[str]:
    """Upload a model written at ``local_model`` and its meta ``record``; lines to print (version ids)."""
    uploaded = transfer.upload_model(local_model, record, output_location(location, default_name), _config(config))
    return [f"uploaded {uploaded.model.describe()}", f"uploaded {uploaded.meta.describe()}"]


def publish_file(local: Path, location: str, default_name: str, config: S3Config | None) -> str:
    """Upload one output file (a prediction CSV); what was written, with its version id."""
    written = transfer.upload_file(local, output_location(location, default_name), _config(config), "text/csv")
    return written.describe()


def lineage_of(inputs: list[S3Object | LocalFile], fingerprint: str, config: S3Config | None,
               init: list[S3Object | LocalFile] = ()) -> dict[str, Any]:
    """The ``lineage`` of a trained model's meta: its inputs, data fingerprint, code and versions."""
    store = config.store if config is not None and any(isinstance(i, S3Object) for i in [*inputs, *init]) else None
    return lineage.lineage_record(inputs=inputs, data_fingerprint=fingerprint, code=lineage.code_version(),
                                  store=store, init=init)

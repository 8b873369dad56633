"""Objects in and out of the store: bounded downloads into a staging directory, uploads that
leave nothing partial behind.

Downloads list first and refuse a prefix over :attr:`S3Config.max_objects` objects or
:attr:`S3Config.max_bytes` bytes before reading any, then stream each object to a file under the
staging directory (names checked: a key never chooses where a file lands). A model and its meta
are uploaded model first; if the meta fails, the model version just created is deleted again,
so a reader never finds a model without the meta that says where it came from.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .storage import (
    S3Config,
    S3Location,
    S3Object,
    StorageError,
    errors_named,
    meta_location,
    parse_s3_url,
    s3_client,
    scrub,
)

CHUNK = 1 << 20
MODEL_SUFFIXES = (".pth", ".pt", ".npz")
LIST_LIMIT = 100_000  # keys listed under one prefix before giving up (a wrong prefix, not a dataset)
META_LIMIT = 1 << 20  # bytes: a meta is a few kB of JSON
META_VERSIONS = 100  # older meta versions searched for the one describing a given model version
_MISSING = ("NoSuchKey", "404")


@dataclass(frozen=True)
class Staged:
    """A downloaded object: where it was put and what exactly was read."""

    path: Path
    source: S3Object


def _folder_of(key: str) -> str:
    return key.rsplit("/", 1)[0] + "/" if "/" in key else ""


def list_objects(url: str, config: S3Config, *, depth: int, suffixes: tuple[str, ...] = ()) -> list[S3Object]:
    """The objects at most ``depth`` levels below the prefix ``url`` (1: its direct children, as
    a local directory of shards), ending with one of ``suffixes`` (any when empty), by key.
    Refused when there are none, too many, or too many bytes."""
    location = parse_s3_url(url)
    if location.version_id:
        raise StorageError(f"{url}: a version names one object, not a prefix")
    prefix, found, listed = location.folder, [], 0
    with errors_named(url, config):
        pages = s3_client(config).get_paginator("list_objects_v2").paginate(
            Bucket=location.bucket, Prefix=prefix, **({"Delimiter": "/"} if depth == 1 else {}))
        for page in pages:
            for item in page.get("Contents", []):
                listed += 1
                relative = item["Key"][len(prefix):]
                wanted = relative.lower().endswith(suffixes or ("",)) and not relative.endswith("/")
                if wanted and relative.count("/") < depth:
                    found.append(S3Object(location.bucket, item["Key"], item["Size"], item["ETag"].strip('"')))
            if listed > LIST_LIMIT or len(found) > config.max_objects:
                break
    if listed > LIST_LIMIT:
        raise StorageError(f"{url}: more than {LIST_LIMIT:,} objects under this prefix; "
                           "name the folder that holds the data")
    if not found:
        raise StorageError(f"{url}: no {'/'.join('*' + s for s in suffixes) or ''} objects under this prefix")
    if len(found) > config.max_objects:
        raise StorageError(f"{url}: more than {config.max_objects:,} objects to download "
                           "(the limit; MNIST_EDGE_S3_MAX_OBJECTS raises it)")
    if (total := sum(o.size for o in found)) > config.max_bytes:
        raise StorageError(f"{url}: {total:,} bytes to download exceed the limit of {config.max_bytes:,} "
                           "(MNIST_EDGE_S3_MAX_BYTES raises it)")
    return found


def _stageable(part: str) -> bool:
    return part not in ("", ".", "..") and len(part) <= 200 and part.isprintable() and "\\" not in part


def stage_path(staging: Path, source: S3Object, prefix: str) -> Path:
    """Where ``source`` lands under ``staging``: its key below ``prefix``, split at ``/``; a part
    that is empty, ``.``, ``..``, unprintable or over 200 characters is refused naming the key."""
    parts = source.key[len(prefix):].split("/")
    if not all(_stageable(p) for p in parts):
        raise StorageError(f"{source.url}: key cannot be staged as a local file (below {prefix or 'the bucket'} "
                           "each '/'-separated part must be a plain file name, not '', '.' or '..')")
    return staging.joinpath(*parts)


def download(objects: Iterable[S3Object], staging: Path, config: S3Config, prefix: str = "") -> list[Staged]:
    """Read each object into ``staging`` (its key below ``prefix``); what was read is returned
    with the version id, ETag, size and sha256 of the bytes actually received. An object that
    changed since it was listed (another ETag) or would pass the byte limit is refused."""
    staged: list[Staged] = []
    budget = config.max_bytes
    for listed in objects:
        target = stage_path(staging, listed, prefix)
        with errors_named(listed.url, config):
            extra = {"VersionId": listed.version_id} if listed.version_id else {}
            response = s3_client(config).get_object(Bucket=listed.bucket, Key=listed.key, **extra)
            size, etag = int(response["ContentLength"]), response["ETag"].strip('"')
            if listed.etag and etag != listed.etag:
                raise StorageError(f"{listed.url}: changed while being read (ETag {listed.etag} listed, "
                                   f"{etag} read); run again")
            if size > budget:
                raise StorageError(f"{listed.url}: {size:,} bytes exceed what is left of the download "
                                   f"limit ({budget:,}; MNIST_EDGE_S3_MAX_BYTES raises it)")
            digest = _write(response["Body"], target, size, listed.url)
        budget -= size
        staged.append(Staged(target, S3Object(listed.bucket, listed.key, size, etag,
                                              response.get("VersionId"), digest)))
    return staged


def _write(body: Any, target: Path, size: int, url: str) -> str:
    digest, received = hashlib.sha256(), 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with body, open(target, "wb") as handle:
            while chunk := body.read(CHUNK):
                received += len(chunk)
                if received > size:
                    raise StorageError(f"{url}: the store sent more than the {size:,} bytes it announced")
                digest.update(chunk)
                handle.write(chunk)
    except OSError as error:
        raise StorageError(f"{url}: cannot stage into {target} ({error.strerror or error})") from None
    if received != size:
        raise StorageError(f"{url}: received {received:,} of {size:,} bytes")
    return digest.hexdigest()


def head(location: S3Location, config: S3Config) -> S3Object:
    """One object's size, ETag and version id, without reading it."""
    try:
        with errors_named(location.url, config):
            extra = {"VersionId": location.version_id} if location.version_id else {}
            found = s3_client(config).head_object(Bucket=location.bucket, Key=location.key, **extra)
    except StorageError as error:
        if error.code != "404":
            raise
        try:  # a HEAD's 404 has no body to say whether the key or the bucket is missing
            with errors_named(location.url, config):
                s3_client(config).head_bucket(Bucket=location.bucket)
        except StorageError as missing:
            if missing.code == "404":
                raise StorageError(f"{location.url}: no such bucket", "NoSuchBucket") from None
            raise
        raise
    return S3Object(location.bucket, location.key, int(found["ContentLength"]), found["ETag"].strip('"'),
                    found.get("VersionId"))


def download_dataset(url: str, staging: Path, config: S3Config) -> list[Staged]:
    """The shards at ``url``: one ``*.csv`` object, or the ``*.csv`` objects directly under the
    prefix (as a local directory of shards), staged under their names."""
    location = parse_s3_url(url)
    if location.key.lower().endswith(".csv"):
        return download([head(location, config)], staging, config, _folder_of(location.key))
    return download(list_objects(url, config, depth=1, suffixes=(".csv",)), staging, config, location.folder)


def download_model_set(url: str, staging: Path, config: S3Config) -> list[Staged]:
    """A model_set for ``aggregate``: every object ``<member>/<file>`` under the prefix."""
    return download(list_objects(url, config, depth=2), staging, config, parse_s3_url(url).folder)


def download_model(url: str, staging: Path, config: S3Config) -> tuple[Staged, Staged | None]:
    """A model object and the meta that describes it (None when there is none), staged under
    their names. The meta must name this model (its ``lineage.output``); for an older version
    of the model, the meta's older versions are searched."""
    location = parse_s3_url(url)
    if not location.key.lower().endswith(MODEL_SUFFIXES):
        raise StorageError(f"{url}: expected a model object ({', '.join(MODEL_SUFFIXES)})")
    model = download([head(location, config)], staging, config, _folder_of(location.key))[0]
    found = meta_for(model.source, config)
    if found is None:
        return model, None
    meta = found[0]  # read again into the staging directory, byte for byte (that version, that ETag)
    return model, download([S3Object(meta.bucket, meta.key, meta.size, meta.etag, meta.version_id)], staging,
                           config, _folder_of(location.key))[0]


# -- the meta beside a model -------------------------------------------------------------------------


def read_meta_object(location: S3Location, config: S3Config) -> tuple[S3Object, dict[str, Any]]:
    """A meta object (at most :data:`META_LIMIT` bytes) and its JSON object."""
    with errors_named(location.url, config):
        extra = {"VersionId": location.version_id} if location.version_id else {}
        response = s3_client(config).get_object(Bucket=location.bucket, Key=location.key, **extra)
        if int(response["ContentLength"]) > META_LIMIT:
            raise StorageError(f"{location.url}: {response['ContentLength']:,} bytes, not a meta "
                               f"(at most {META_LIMIT:,})")
        with response["Body"] as body:
            raw = body.read(META_LIMIT + 1)
    try:
        document = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise StorageError(f"{location.url}: not a JSON meta file") from None
    if not isinstance(document, dict):
        raise StorageError(f"{location.url}: expected a JSON object, got {type(document).__name__}")
    read = S3Object(location.bucket, location.key, len(raw), response["ETag"].strip('"'),
                    response.get("VersionId"), hashlib.sha256(raw).hexdigest())
    return read, document


def describes(document: dict[str, Any], model: S3Object) -> bool:
    """Whether a meta names this model object in ``lineage.output`` (version id, else sha256,
    else ETag); a meta without ``lineage.output`` (written locally, or by an older version)
    cannot say, and is taken as describing it."""
    lineage = document.get("lineage")
    output = lineage.get("output") if isinstance(lineage, dict) else None
    if not isinstance(output, dict):
        return True
    for key in ("version_id", "sha256", "etag"):
        if output.get(key) and getattr(model, key):
            return bool(output[key] == getattr(model, key))
    return False


def meta_for(model: S3Object, config: S3Config) -> tuple[S3Object, dict[str, Any]] | None:
    """The meta object describing ``model`` (the current one, or for an older model version the
    newest of the meta's last :data:`META_VERSIONS` versions that names it), or None."""
    location = meta_location(S3Location(model.bucket, model.key))
    try:
        found = read_meta_object(location, config)
    except StorageError as error:
        if error.code in _MISSING:
            return None
        raise
    if describes(found[1], model):
        return found
    if not model.version_id:
        return None
    with errors_named(location.url, config):
        listing = s3_client(config).list_object_versions(Bucket=location.bucket, Prefix=location.key,
                                                         MaxKeys=META_VERSIONS)
    for version in listing.get("Versions", []):
        if version["Key"] == location.key and version["VersionId"] != found[0].version_id:
            candidate = read_meta_object(S3Location(location.bucket, location.key, version["VersionId"]), config)
            if describes(candidate[1], model):
                return candidate
    return None


# -- uploads ---------------------------------------------------------------------------------------


def upload_file(path: Path, location: S3Location, config: S3Config, content_type: str) -> S3Object:
    """Put one file in a single request (the whole object or none); returns what was written."""
    with open(path, "rb") as handle:
        return _put(handle, location, config, content_type)


def _put(handle: BinaryIO, location: S3Location, config: S3Config, content_type: str) -> S3Object:
    digest = hashlib.file_digest(handle, "sha256").hexdigest()
    size = handle.tell()
    handle.seek(0)
    with errors_named(location.url, config):
        written = s3_client(config).put_object(Bucket=location.bucket, Key=location.key, Body=handle,
                                               ContentType=content_type)
    return S3Object(location.bucket, location.key, size, written["ETag"].strip('"'),
                    written.get("VersionId"), digest)


@dataclass(frozen=True)
class UploadedModel:
    model: S3Object
    meta: S3Object
    document: dict[str, Any]  # the meta as uploaded: the given one plus lineage.output


def upload_model(model_file: Path, meta: dict[str, Any], location: S3Location, config: S3Config) -> UploadedModel:
    """Put the model, then its meta with ``lineage.output`` naming the model object just written.
    If the meta cannot be written, the model version is deleted again (StorageError says so, or
    names what was left behind if even that failed)."""
    model = upload_file(model_file, location, config, "application/octet-stream")
    document = {**meta, "lineage": {**meta.get("lineage", {}), "output": model.as_dict()}}
    body = io.BytesIO((json.dumps(document, indent=2) + "\n").encode("utf-8"))
    try:
        written = _put(body, meta_location(location), config, "application/json")
    except StorageError as error:
        raise StorageError(f"{error}; {_remove(model, config)}") from None
    except BaseException:  # a Ctrl-C between the two puts: still no model without its meta
        _remove(model, config)
        raise
    return UploadedModel(model, written, document)


def _remove(written: S3Object, config: S3Config) -> str:
    """Delete what an unfinished upload wrote; a sentence saying what was done."""
    try:
        with errors_named(written.url, config):
            extra = {"VersionId": written.version_id} if written.version_id else {}
            s3_client(config).delete_object(Bucket=written.bucket, Key=written.key, **extra)
    except StorageError as error:
        return f"the model was left behind: remove {written.url} by hand ({scrub(str(error), config)})"
    if written.version_id:
        return f"removed the model version it would have described ({written.url}); nothing was left"
    return (f"removed {written.describe()}; nothing was left (the bucket is not versioned: an object "
            "it replaced cannot be restored)")

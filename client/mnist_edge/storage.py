"""``s3://bucket/prefix`` beside local paths: datasets and models in a (versioned) object store.

A Kubeflow job or a Pachyderm pipeline reads its shards from the store's S3 gateway and writes
the model back. Every object read or written is returned with its bucket, key, size, ETag,
version id and sha256, so a model's meta can say exactly which bytes it came from
(:mod:`mnist_edge.lineage`). The client is boto3 on an explicit :class:`S3Config` that the entry
point builds once from the environment; nothing here reads ``os.environ``. It speaks path-style
(Pachyderm's buckets are ``<branch>.<repo>``, e.g. ``master.mnist-shards``) and sends checksums
only where S3 requires them (boto3 >= 1.36 adds them to every upload, which some non-AWS
gateways refuse). Failures are :class:`StorageError`: one line naming the ``s3://`` URL, never
a credential or a boto traceback. The transfers themselves are in :mod:`mnist_edge.transfer`.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import meta
from .errors import UserError

SCHEME = "s3://"
META_SUFFIX = meta.SUFFIX
# botocore's own rule for a bucket name (it accepts Pachyderm's underscores and capitals).
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")
_VERSION = re.compile(r"^(?P<rest>.*)\?versionId=(?P<version>[^&?/]+)$")
# What an access key id looks like (AKIA: long-term, ASIA: temporary): never shown, whatever said it.
_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b")
_FALSE = ("0", "false", "no", "off")


class StorageError(UserError):
    """An object-store location that cannot be read or written; the message names the URL.
    ``code`` is the store's error code (``NoSuchKey``, ``404``, ...) where it gave one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class _SetupError(StorageError):
    """The client cannot be made (half the credentials, an unknown profile): named by the URL used."""


@dataclass(frozen=True)
class S3Config:
    """How to reach the store: read once from the environment by the entry point.

    Credentials left empty come from botocore's own chain (``AWS_PROFILE``, the shared files,
    web identity, container and instance roles), which reads its standard variables itself.
    """

    endpoint_url: str | None = None
    region: str = "us-east-1"
    profile: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    verify_tls: bool = True
    connect_timeout: float = 5.0  # seconds; an unreachable endpoint fails in a few seconds, not minutes
    read_timeout: float = 60.0
    max_attempts: int = 2  # one retry
    max_objects: int = 10_000  # per download: a prefix with more is refused, not half-read
    max_bytes: int = 8 * 2**30  # per download, in bytes

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> S3Config:
        """``S3_ENDPOINT`` (TensorFlow's and the Kubeflow/Pachyderm documents' name; ``host:port``
        with ``S3_USE_HTTPS``/``S3_VERIFY_SSL``) or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``;
        ``AWS_REGION``/``AWS_DEFAULT_REGION``; ``AWS_PROFILE``; the ``AWS_*`` key variables;
        ``MNIST_EDGE_S3_MAX_OBJECTS``/``MNIST_EDGE_S3_MAX_BYTES`` to raise the download bounds."""
        def get(*names: str) -> str | None:
            return next((environ[n].strip() for n in names if environ.get(n, "").strip()), None)

        endpoint = get("S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        if endpoint and "://" not in endpoint:
            endpoint = ("http://" if environ.get("S3_USE_HTTPS", "1").lower() in _FALSE else "https://") + endpoint
        limits = {name: _count(environ, var, high) for name, var, high in
                  (("max_objects", "MNIST_EDGE_S3_MAX_OBJECTS", MAX_OBJECTS_LIMIT),
                   ("max_bytes", "MNIST_EDGE_S3_MAX_BYTES", MAX_BYTES_LIMIT))
                  if var in environ}
        return cls(endpoint_url=endpoint, region=get("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1",
                   profile=get("AWS_PROFILE"), access_key_id=get("AWS_ACCESS_KEY_ID"),
                   secret_access_key=get("AWS_SECRET_ACCESS_KEY"), session_token=get("AWS_SESSION_TOKEN"),
                   verify_tls=environ.get("S3_VERIFY_SSL", "1").lower() not in _FALSE, **limits)

    @property
    def store(self) -> str:
        """The endpoint without any user:password part (safe to print and record), or ``AWS S3``."""
        if not self.endpoint_url:
            return "AWS S3"
        parts = urlsplit(self.endpoint_url)
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:  # not a port number: botocore will say so, naming no credential
            port = ""
        return urlunsplit((parts.scheme, parts.hostname or "", "", "", "")) + port


MAX_OBJECTS_LIMIT = 10_000_000
MAX_BYTES_LIMIT = 2**44  # 16 TiB
"""The most the download bounds may be raised to: a bound, not a way to switch the bound off."""


def _count(environ: Mapping[str, str], name: str, high: int) -> int:
    """A set variable (set but blank fails too: a templating slip, not a choice) as 1 to ``high``."""
    value = environ[name].strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 20 and 1 <= int(value) <= high):
        raise StorageError(f"{name}={value[:40]!r}: expected a whole number from 1 to {high:,}")
    return int(value)


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/key``; ``version_id`` from a ``?versionId=`` suffix (one object's version)."""

    bucket: str
    key: str
    version_id: str | None = None

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" + (f"?versionId={self.version_id}" if self.version_id else "")

    def child(self, name: str) -> S3Location:
        """``name`` inside this location taken as a folder."""
        return S3Location(self.bucket, self.folder + name)

    @property
    def folder(self) -> str:
        """The key as a prefix: ``''`` (the bucket) or ending with ``/``."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"


@dataclass(frozen=True)
class S3Object:
    """One object as it was read or written: what a model's lineage records of it."""

    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None = None  # None where the bucket is not versioned
    sha256: str | None = None  # of the bytes transferred; None for a listing not yet read

    @property
    def url(self) -> str:
        return S3Location(self.bucket, self.key, self.version_id).url

    def as_dict(self) -> dict[str, Any]:
        return {"url": f"{SCHEME}{self.bucket}/{self.key}", **asdict(self)}

    def describe(self) -> str:
        """``s3://bucket/key (version V)``: how an output is announced."""
        version = f"version {self.version_id}" if self.version_id else "unversioned bucket"
        return f"{SCHEME}{self.bucket}/{self.key} ({version})"


def is_s3_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(SCHEME)


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket[/key][?versionId=V]``, or StorageError naming what is wrong with it."""
    if not is_s3_url(url):
        raise StorageError(f"{url[:200]!r}: expected an s3://bucket/key URL")
    rest, version = url[len(SCHEME):], None
    if match := _VERSION.match(rest):
        rest, version = match["rest"], match["version"]
    bucket, _, key = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise StorageError(f"{url[:200]}: {bucket[:80]!r} is not a bucket name "
                           "(1-255 letters, digits, '.', '-', '_')")
    if "\x00" in key or len(key.encode()) > 1024:
        raise StorageError(f"{url[:200]}: not an S3 key (at most 1024 bytes, no NUL)")
    return S3Location(bucket, key, version)


def output_location(url: str, default_name: str) -> S3Location:
    """``url``, or ``url/default_name`` when it names a bucket or ends with ``/`` (as a local directory)."""
    location = parse_s3_url(url)
    if location.version_id:
        raise StorageError(f"{url}: an output cannot name a version; the store assigns one")
    return location.child(default_name) if location.folder == location.key else location


def meta_location(model: S3Location) -> S3Location:
    """The meta object beside a model: ``<dir>/<stem>.xdata-meta.json``, as for a local file."""
    path = PurePosixPath(model.key)
    return S3Location(model.bucket, str(path.with_name(path.stem + META_SUFFIX)))


# -- the client and its errors ---------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def s3_client(config: S3Config) -> Any:
    """A boto3 S3 client for ``config`` (one per configuration; boto3 clients are thread-safe)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    if bool(config.access_key_id) != bool(config.secret_access_key):
        given, missing = (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if config.access_key_id
                          else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"))
        raise _SetupError(f"{given} is set but {missing} is not; set both or neither")
    botocore_config = Config(
        region_name=config.region, signature_version="s3v4",
        s3={"addressing_style": "path" if config.endpoint_url else "auto"},
        connect_timeout=config.connect_timeout, read_timeout=config.read_timeout,
        retries={"max_attempts": config.max_attempts, "mode": "standard"},
        request_checksum_calculation="when_required", response_checksum_validation="when_required")
    try:
        session = boto3.session.Session(
            aws_access_key_id=config.access_key_id, aws_secret_access_key=config.secret_access_key,
            aws_session_token=config.session_token, profile_name=config.profile)
        return session.client("s3", endpoint_url=config.endpoint_url, config=botocore_config,
                              verify=config.verify_tls)
    except BotoCoreError as error:  # an unknown profile, an endpoint that is not a URL
        raise _SetupError(scrub(str(error), config)) from None


def scrub(text: str, config: S3Config, limit: int = 300) -> str:
    """``text`` on one line, cut to ``limit``, with every credential of ``config`` (and anything
    shaped like an access key id) replaced by ``***``."""
    for secret in (config.secret_access_key, config.session_token, config.access_key_id):
        if secret:
            text = text.replace(secret, "***")
    text = _KEY_ID.sub("***", " ".join(text.split()))
    return text if len(text) <= limit else text[:limit] + "..."


_CLIENT_ERRORS = {
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such object",
    "404": "no such object",
    "NoSuchVersion": "no such version of this object",
    "InvalidAccessKeyId": "the store does not know this access key (check AWS_ACCESS_KEY_ID or the profile)",
    "SignatureDoesNotMatch": "the secret key does not match the access key (check AWS_SECRET_ACCESS_KEY)",
    "ExpiredToken": "the session token has expired (refresh the credentials)",
    "AccessDenied": "access denied to these credentials",
    "403": "access denied (HTTP 403: wrong credentials, or no permission for this object)",
}


@contextlib.contextmanager
def errors_named(url: str, config: S3Config) -> Iterator[None]:
    """Turn what boto3 raises inside the block into one StorageError line naming ``url``."""
    from botocore import exceptions as bx

    try:
        yield
    except _SetupError as error:
        raise StorageError(f"{url}: {error}") from None
    except bx.ClientError as error:
        details = error.response.get("Error", {})
        code = str(details.get("Code", "?"))
        said = _CLIENT_ERRORS.get(code) or f"{code}: {details.get('Message') or error}"
        raise StorageError(f"{url}: {scrub(said, config)}", code) from None
    except (bx.ConnectionError, bx.ConnectionClosedError) as error:
        reason = (f"no answer within {config.connect_timeout:g} s" if isinstance(error, bx.ConnectTimeoutError)
                  else "TLS failed" if isinstance(error, bx.SSLError)
                  else "the connection closed" if isinstance(error, bx.ConnectionClosedError)
                  else "connection refused or no route")
        raise StorageError(f"{url}: cannot reach the object store at {config.store} ({reason}; "
                           "check S3_ENDPOINT and the network)") from None
    except bx.ReadTimeoutError:
        raise StorageError(f"{url}: the object store at {config.store} did not answer within "
                           f"{config.read_timeout:g} s") from None
    except bx.NoCredentialsError:
        raise StorageError(f"{url}: no credentials found (set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from None
    except bx.BotoCoreError as error:
        raise StorageError(f"{url}: {scrub(str(error), config)}") from None

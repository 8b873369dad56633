"""Where a model came from: the lineage record its meta carries, and ``python -m mnist_edge lineage``.

The record travels inside the meta object itself (Pachyderm's S3 gateway drops ``x-amz-meta-*``
headers): every input object (bucket, key, size, ETag, version id, sha256) or local file, the
data fingerprint, the model it started from, the code (package version and git commit) and the
Python and torch versions. The git commit is known two ways: an image built by the root
``Dockerfile`` with ``--build-arg GIT_COMMIT=$(git rev-parse HEAD)`` carries it in the file
``mnist_edge/GIT_COMMIT``; a checkout (``pip install -e``) asks ``git`` about the package's own
directory, dirty or not. Otherwise it is recorded as unknown (null), never guessed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from . import meta as meta_module
from .storage import META_SUFFIX, S3Config, S3Object, StorageError, is_s3_url, parse_s3_url
from .transfer import head, meta_for, read_meta_object

PACKAGE = "mnist-edge"
PACKAGE_DIR = Path(__file__).resolve().parent
GIT_COMMIT_FILE = PACKAGE_DIR / "GIT_COMMIT"


@dataclass(frozen=True)
class CodeVersion:
    package: str
    version: str | None
    git_commit: str | None
    git_dirty: bool | None  # uncommitted changes under the package's directory; None when not known
    commit_from: str | None  # "image build" (the GIT_COMMIT file), "git checkout", or None


@functools.lru_cache(maxsize=1)
def code_version() -> CodeVersion:
    """This package's version and git commit, as far as they can be known (see the module doc)."""
    try:
        version: str | None = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = None
    try:
        built = GIT_COMMIT_FILE.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        built = ""
    if built:
        return CodeVersion(PACKAGE, version, built[:64], None, "image build")
    commit = _git("rev-parse", "HEAD")
    if commit is None or _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return CodeVersion(PACKAGE, version, None, None, None)  # no git, or a repository not ours
    status = _git("status", "--porcelain", "--untracked-files=normal", "--", ".")
    return CodeVersion(PACKAGE, version, commit, None if status is None else bool(status), "git checkout")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def runtime_versions() -> dict[str, str | None]:
    """Python and the libraries the numbers depend on (from the installed distributions)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "numpy", "opacus"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass(frozen=True)
class LocalFile:
    """A local input file, as the lineage records it."""

    path: str
    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path, sha256: str | None = None) -> LocalFile:
        """``path`` (absolute) with its size and sha256 (computed unless given, e.g. by the shard reader)."""
        path = Path(path).resolve()
        if sha256 is None:
            with open(path, "rb") as handle:
                sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
        return cls(str(path), path.stat().st_size, sha256)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lineage_record(*, inputs: Sequence[S3Object | LocalFile], data_fingerprint: str | None,
                   code: CodeVersion, store: str | None = None,
                   init: Sequence[S3Object | LocalFile] = ()) -> dict[str, Any]:
    """The ``lineage`` object of a meta. ``store``: where the ``s3://`` URLs live
    (:attr:`S3Config.store`, no credentials); ``init``: the model (and its meta) training began from.
    An upload adds ``output``: the model object it wrote (:func:`transfer.upload_model`)."""
    return {
        "store": store,
        "inputs": [item.as_dict() for item in inputs],
        "data_fingerprint": data_fingerprint,
        "init": [item.as_dict() for item in init],
        "code": asdict(code),
        "runtime": runtime_versions(),
    }


# -- the lineage command ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """A model's meta and whether it names the model that is there now."""

    model: str
    meta: str
    document: dict[str, Any]
    matches: bool | None  # None: the meta records nothing to compare with


def find_lineage(model: str, config: S3Config) -> Found:
    """The meta describing ``model`` (a local model file or meta, or an ``s3://`` model or meta)."""
    if is_s3_url(model):
        location = parse_s3_url(model)
        if location.key.endswith(META_SUFFIX):
            source, document = read_meta_object(location, config)
            return Found("(not checked: a meta was named)", source.describe(), document, None)
        current = head(location, config)
        found = meta_for(current, config)
        if found is None:
            raise StorageError(f"{model}: no meta beside it names this model version "
                               f"(expected {META_SUFFIX} beside the model, written with it)")
        return Found(current.describe(), found[0].describe(), found[1], True if _output(found[1]) else None)
    path = Path(model)
    meta = path if path.name.endswith(META_SUFFIX) else meta_module.meta_path(path)
    if not meta.is_file():
        raise StorageError(f"{meta}: no meta beside the model (train writes <stem>{META_SUFFIX})")
    document = meta_module.read(meta)
    output = _output(document)
    matches = None
    if meta != path and output.get("sha256"):
        with open(path, "rb") as handle:
            matches = hashlib.file_digest(handle, "sha256").hexdigest() == output["sha256"]
    return Found(str(path), str(meta), document, matches)


def _output(document: dict[str, Any]) -> dict[str, Any]:
    """``lineage.output`` of an (untrusted) meta, or ``{}``."""
    lineage = document.get("lineage")
    output = lineage.get("output") if isinstance(lineage, dict) else None
    return output if isinstance(output, dict) else {}


def _text(value: Any, limit: int = 120) -> str:
    """An untrusted meta value for a terminal: control characters escaped, cut to ``limit``."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _item(item: Any) -> str:
    if not isinstance(item, dict):
        return _text(item)
    where = item.get("url") or item.get("path") or item.get("model") or "?"
    facts = [f"{name} {_text(item[key], 64)}" for name, key in
             (("version", "version_id"), ("etag", "etag"), ("sha256", "sha256"), ("data", "data_fingerprint"))
             if item.get(key)]
    size = f"{item['size']:,} bytes" if isinstance(item.get("size"), int) else None
    return "  ".join([_text(where), *facts, *([size] if size else [])])


def format_lineage(found: Found) -> str:
    """What a person reads: the model, its data, its start, its code and runtime."""
    meta = found.document
    lineage = meta.get("lineage") if isinstance(meta.get("lineage"), dict) else {}
    lines = [f"model    {_text(found.model, 300)}", f"meta     {_text(found.meta, 300)}"]
    if found.matches is not None:
        lines.append("check    " + ("the meta names this model" if found.matches
                                    else "MISMATCH: this meta describes another model file"))
    state = [f"{meta.get(k)} {k}" for k in ("round", "num_examples", "epochs") if meta.get(k) is not None]
    lines.append(f"made     {_text(meta.get('model_state', '?'))} ({', '.join(state)}) at "
                 f"{_text(meta.get('created_at', 'an unrecorded time'))}")
    lines.append(f"data     fingerprint {_text(lineage.get('data_fingerprint') or meta.get('data_fingerprint'))}")
    for item in lineage.get("inputs") or []:
        lines.append(f"  input  {_item(item)}")
    for item in meta.get("parents") or []:
        lines.append(f"  parent {_item(item)}")
    for item in lineage.get("init") or []:
        lines.append(f"init     {_item(item)}")
    code = lineage.get("code") if isinstance(lineage.get("code"), dict) else None
    if code:
        commit = code.get("git_commit")
        dirty = {True: ", uncommitted changes", False: ", clean"}.get(code.get("git_dirty"), "")
        where = f"{_text(commit, 64)} ({_text(code.get('commit_from'))}{dirty})" if commit else "commit unknown"
        lines.append(f"code     {_text(code.get('package'))} {_text(code.get('version'))}, git {where}")
    runtime = lineage.get("runtime")
    if isinstance(runtime, dict):
        lines.append("runtime  " + ", ".join(f"{_text(k, 20)} {_text(v, 40)}" for k, v in runtime.items()))
    if lineage.get("store"):
        lines.append(f"store    {_text(lineage['store'])}")
    if not lineage:
        lines.append("lineage  none recorded (a local run, or a model from before lineage was recorded)")
    return "\n".join(lines)

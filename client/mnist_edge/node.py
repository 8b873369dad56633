"""The node's configuration: read once from the environment where the process starts, then passed down.

What a node's operator decides (where the images are, the privacy budget, how many threads, the
compute lock) lives here and nowhere else, and no task can change it. Every variable fails closed:
a value that is set but empty, blank, not a number, NaN, infinite or out of range is refused with
the variable's name, and so is an unknown ``MNIST_EDGE_*`` name, so a typo can never switch
privacy off. Only the entry points (``edge.register``, ``cli.main``) call :meth:`NodeConfig.from_environment`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import UserError

DATA_DIR = "SCALEOUT_DATA_DIR"
CLIENT_NUMBER = "CLIENT_NUMBER"
TOTAL_CLIENTS = "TOTAL_N_CLIENTS"
COMPUTE_LOCK = "SCALEOUT_CLIENT_COMPUTE_LOCK"
THREADS = "MNIST_EDGE_THREADS"
DP_EPSILON = "MNIST_EDGE_DP_EPSILON"
DP_DELTA = "MNIST_EDGE_DP_DELTA"
DP_ROUNDS = "MNIST_EDGE_DP_ROUNDS"
DP_LEDGER = "MNIST_EDGE_DP_LEDGER"
DIST_TIMEOUT = "MNIST_EDGE_DIST_TIMEOUT"
S3_LIMITS = ("MNIST_EDGE_S3_MAX_OBJECTS", "MNIST_EDGE_S3_MAX_BYTES")  # read by storage.S3Config
KNOWN = (THREADS, DP_EPSILON, DP_DELTA, DP_ROUNDS, DP_LEDGER, DIST_TIMEOUT, *S3_LIMITS)
"""Every ``MNIST_EDGE_*`` variable there is; any other name with that prefix is refused."""
REMOVED = {"MNIST_EDGE_BATCH_PARTS": "training no longer splits a batch into parts"}
"""Variables older versions read, and why they went: a node still setting one is told to unset it."""

DEFAULT_DATA_DIR = "data"
DEFAULT_DELTA = 1e-5
DEFAULT_DP_ROUNDS = 10
MAX_EPSILON = 100.0
MAX_DP_ROUNDS = 10_000
MAX_THREADS = 1024
MAX_CLIENTS = 10_000
STATE_DIR = ".mnist-edge"
"""The node's own files inside its data directory (the privacy ledger): never a task's to read or write."""
LEDGER_NAME = "privacy-ledger.jsonl"


class NodeConfigError(UserError, ValueError):
    """A node variable holds something this package cannot use; the message names the variable."""


@dataclass(frozen=True)
class PrivacyLimits:
    """The data owner's privacy limits; no round can loosen them."""

    epsilon: float | None = None  # the total budget; None: no budget (DP only when a round asks)
    delta: float = DEFAULT_DELTA
    rounds: int = DEFAULT_DP_ROUNDS  # the rounds a budget is planned for
    ledger: Path | None = None  # where charged rounds are recorded; None: no DP round may run


@dataclass(frozen=True)
class NodeConfig:
    """One node, as its operator configured it. Paths are absolute."""

    data_dir: Path
    privacy: PrivacyLimits = field(default_factory=PrivacyLimits)
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    compute_lock: Path | None = None  # held around train and validate: one client computes at a time
    client_number: int | None = None
    total_clients: int | None = None

    @classmethod
    def for_data(cls, data_dir: str | Path, **privacy: object) -> NodeConfig:
        """A node serving ``data_dir`` with its ledger in the data (tools and tests that play a node)."""
        data_dir = Path(data_dir).absolute()
        limits = replace(PrivacyLimits(ledger=data_dir / STATE_DIR / LEDGER_NAME), **privacy)
        return cls(data_dir, limits)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], cwd: Path, cpu_count: int) -> NodeConfig:
        """The node as the process's environment describes it (relative paths from ``cwd``)."""
        number = _integer(environ, CLIENT_NUMBER, 0, MAX_CLIENTS - 1)
        total = _integer(environ, TOTAL_CLIENTS, 1, MAX_CLIENTS)
        if number is not None and total is not None and number >= total:
            raise NodeConfigError(f"{CLIENT_NUMBER} {number} must be below {TOTAL_CLIENTS} {total} "
                                  "(clients are numbered from 0)")
        root = cwd / _text(environ, DATA_DIR, DEFAULT_DATA_DIR)
        data_dir = client_data_dir(root, number, explicit=DATA_DIR in environ).absolute()
        lock = _text(environ, COMPUTE_LOCK, None)
        return cls(data_dir, privacy_from(environ, data_dir, cwd), threads_from(environ, cpu_count),
                   None if lock is None else (cwd / lock).absolute(), number, total)


def threads_from(environ: Mapping[str, str], cpu_count: int) -> int | None:
    """``MNIST_EDGE_THREADS``; else, with ``TOTAL_N_CLIENTS`` clients on the box, a fair share of its
    cores (none under the compute lock: each client then computes alone, on all of them)."""
    threads = _integer(environ, THREADS, 1, MAX_THREADS)
    total = _integer(environ, TOTAL_CLIENTS, 1, MAX_CLIENTS)
    if threads is None and total is not None and _text(environ, COMPUTE_LOCK, None) is None:
        threads = max(1, cpu_count // total)
    return threads


def client_data_dir(root: Path, number: int | None, explicit: bool) -> Path:
    """The data directory of client ``number`` under ``root`` (``prepare``'s ``client-<n>/`` layout).

    An ``explicit`` ``SCALEOUT_DATA_DIR`` that holds a split of its own is this client's and wins;
    the default root is always the layout's (a split at its top would be every client's at once).
    """
    if number is None or (explicit and _has_split(root)):
        return root
    mine = root / f"client-{number}"
    if not mine.is_dir():
        raise NodeConfigError(f"{mine}: no such directory: with {CLIENT_NUMBER}={number} the data root "
                              f"{root} ({DATA_DIR}) must hold client-{number}/ (the layout `prepare` writes), "
                              f"or {DATA_DIR} must name this client's own data directory")
    return mine


def _has_split(directory: Path) -> bool:
    return any((directory / name).exists() for name in ("train", "train.csv", "test", "test.csv"))


def privacy_from(environ: Mapping[str, str], data_dir: Path | None, cwd: Path,
                 ledger: Path | None = None) -> PrivacyLimits:
    """The ``MNIST_EDGE_DP_*`` limits; the ledger lives with the data unless the operator moves it.

    ``ledger``: a path given on the command line (``--ledger``), which wins. Every ``MNIST_EDGE_*``
    name is checked here (an unknown one is refused), so every entry point that reads the privacy
    limits refuses a typo. Data with no local directory (in a bucket) has no ledger unless the
    operator names one: a DP run there is refused.
    """
    unknown = sorted(name for name in environ if name.startswith("MNIST_EDGE_") and name not in KNOWN)
    removed = [name for name in unknown if name in REMOVED]
    if removed:
        raise NodeConfigError(f"node variable {removed[0]} is no longer read ({REMOVED[removed[0]]}); "
                              "unset it")
    if unknown:
        raise NodeConfigError(f"unknown node variable {_shown(unknown[0])} (a typo?); known: {', '.join(KNOWN)}")
    named = _text(environ, DP_LEDGER, None)
    if ledger is None and named:
        ledger = (cwd / named).absolute()
    elif ledger is None and data_dir is not None:
        ledger = default_ledger(data_dir, cwd)
    return PrivacyLimits(
        epsilon=_number(environ, DP_EPSILON, f"a number > 0 and <= {MAX_EPSILON:g}",
                        lambda v: 0 < v <= MAX_EPSILON),
        delta=_number(environ, DP_DELTA, "a number between 0 and 1 (exclusive)",
                      lambda v: 0 < v < 1) or DEFAULT_DELTA,
        rounds=_integer(environ, DP_ROUNDS, 1, MAX_DP_ROUNDS) or DEFAULT_DP_ROUNDS,
        ledger=ledger,
    )


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel job (``torchrun``, a Kubeflow job): torch's variables."""

    rank: int
    world_size: int
    local_rank: int = 0
    timeout: float = 60.0  # seconds a collective waits for a lost rank before the job fails

    @property
    def writes(self) -> bool:
        """Rank 0 alone writes the model, its meta and anything else; the others never write."""
        return self.rank == 0


def ranks_from(environ: Mapping[str, str]) -> Ranks | None:
    """``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` as torchrun and Kubeflow's PyTorchJob set them; None alone."""
    world = _integer(environ, "WORLD_SIZE", 1, MAX_CLIENTS)
    if world is None or world == 1:
        return None
    rank = _integer(environ, "RANK", 0, world - 1)
    if rank is None:
        raise NodeConfigError(f"WORLD_SIZE is {world} but RANK is not set: start the job with torchrun "
                              "(or a launcher that sets RANK, MASTER_ADDR and MASTER_PORT)")
    timeout = _number(environ, DIST_TIMEOUT, "a number of seconds from 1 to 3600", lambda v: 1 <= v <= 3600)
    return Ranks(rank, world, _integer(environ, "LOCAL_RANK", 0, MAX_CLIENTS - 1) or 0, timeout or 60.0)


def default_ledger(data_dir: Path, cwd: Path) -> Path:
    """``<data_dir>/.mnist-edge/privacy-ledger.jsonl``; refused while an older ledger waits in ``cwd``.

    Ledgers used to live in the client's working directory: a node started where one still lies,
    with none in its data directory, would silently begin a new budget, so it is refused until the
    operator moves the old ledger (or names it with ``MNIST_EDGE_DP_LEDGER``).
    """
    ledger = (data_dir / STATE_DIR / LEDGER_NAME).absolute()
    old = (cwd / LEDGER_NAME).absolute()
    if (old.exists() or old.is_symlink()) and not ledger.exists() and old != ledger:
        raise NodeConfigError(
            f"{old}: a privacy ledger in the working directory, where ledgers were kept before they moved into "
            f"the data directory. This node's ledger is {ledger}, which does not exist, so starting now would "
            f"begin a new budget: move the old ledger there (mkdir -p {ledger.parent} && mv {old} {ledger}), "
            f"or set {DP_LEDGER} to its path")
    return ledger


def _raw(environ: Mapping[str, str], name: str) -> str | None:
    """The variable's text, None when unset; set but blank fails (a templating slip, not a choice)."""
    if name not in environ:
        return None
    text = environ[name]
    if not text.strip():
        raise NodeConfigError(f"environment variable {name} is set but empty; unset it or give a value")
    return text.strip()


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 40 else f"{text[:40]!r}... ({len(text)} characters)"


def _text(environ: Mapping[str, str], name: str, default: str | None) -> str | None:
    text = _raw(environ, name)
    if text is not None and "\x00" in text:
        raise NodeConfigError(f"environment variable {name} contains a NUL character")
    return default if text is None else text


def _integer(environ: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    text = _raw(environ, name)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 9 and low <= int(text) <= high):
        raise NodeConfigError(f"environment variable {name} must be a whole number from {low} to {high}, "
                              f"got {_shown(text)}")
    return int(text)


def _number(environ: Mapping[str, str], name: str, rule: str, ok) -> float | None:
    text = _raw(environ, name)
    if text is None:
        return None
    try:
        value = float(text) if len(text) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise NodeConfigError(f"environment variable {name} must be {rule}, got {_shown(text)}")
    return value

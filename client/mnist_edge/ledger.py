"""The node's privacy ledger: one JSON line per charged round, appended and fsync'd before training.

Why an append-only log: a ``kill -9`` at any instant must neither lose a charge nor corrupt the
file. A record is one ``write`` of one line, fsync'd before the round's first batch, so a round
either has its whole line (charged, even if it then crashed: the node cannot know what leaked) or
a torn last line, which is dropped because training never began for it. Each line carries the
sha256 of the line before it, and every ε is recomputed from σ, q, steps and δ when the ledger is
read, so a hand edit, a deleted or reordered record or a flipped bit fails the next train task
loudly instead of silently resetting the budget.

Accounting is Opacus's RDP accountant (``RDPAccountant``: its orders, ``compute_rdp`` and
``get_privacy_spent``); rounds compose by adding their RDP curves, so the total is tighter than
the sum of the rounds' ε and never decreases.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from .errors import UserError
from .files import fsync_directory

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock (one client per working directory)
    fcntl = None

FORMAT = 1
ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


class PrivacyError(UserError, ValueError):
    """A DP round cannot run as asked; the message says why."""


class LedgerError(PrivacyError):
    """The ledger is unreadable, corrupt or edited: train tasks fail until a person looks at it."""


class BudgetExceeded(PrivacyError):
    """The round would push the node's total ε past its budget: refused before any training."""


@dataclass(frozen=True)
class Record:
    """One charged round. ``epsilon_total`` is all charged rounds composed, this one included."""

    format: int
    time: str  # UTC, ISO 8601
    model_id: str
    data_fingerprint: str
    noise_multiplier: float  # σ
    max_grad_norm: float  # C
    sample_rate: float  # q: Poisson sampling probability of each image per step
    steps: int
    delta: float
    epsilon_round: float
    epsilon_total: float
    budget: float | None  # the node's MNIST_EDGE_DP_EPSILON when charged (None: no budget)
    prev: str  # sha256 of the previous line ("" for the first)


@functools.lru_cache(maxsize=256)
def _rdp(noise_multiplier: float, sample_rate: float, steps: int) -> tuple[float, ...]:
    """The RDP curve of one round (cached: rounds usually repeat their settings)."""
    curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps,
                                     orders=ORDERS)
    return tuple(np.atleast_1d(curve).tolist())


def round_rdp(noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    return np.asarray(_rdp(float(noise_multiplier), float(sample_rate), int(steps)))


def epsilon(rdp_curve: np.ndarray, delta: float) -> float:
    """ε at ``delta`` of a composed RDP curve (what ``RDPAccountant.get_epsilon`` returns)."""
    if not np.any(rdp_curve):
        return 0.0
    eps, _order = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp_curve, delta=delta)
    return float(eps)


@dataclass
class Ledger:
    """The charged rounds of one ledger file, verified."""

    path: Path
    records: list[Record]
    rdp_total: np.ndarray
    last_hash: str = ""
    valid_size: int = 0  # bytes up to the end of the last record; a torn tail lies beyond
    needs_newline: bool = False  # the last record was written without its newline

    @property
    def spent(self) -> float:
        return self.records[-1].epsilon_total if self.records else 0.0

    @property
    def delta(self) -> float | None:
        return self.records[0].delta if self.records else None


def _corrupt(path: Path, line: int, what: str) -> LedgerError:
    return LedgerError(
        f"privacy ledger {path}: line {line}: {what}. The ledger is corrupt or was edited and is never "
        "reset automatically: restore it from a backup, or (the node's operator only) move it away to "
        "start a new budget")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_record(path: Path, number: int, raw: Any) -> Record:
    """A record with exactly the known keys, each of the right type and range."""
    names = [f.name for f in fields(Record)]
    if not isinstance(raw, dict) or sorted(raw) != sorted(names):
        raise _corrupt(path, number, f"expected a JSON object with the keys {', '.join(names)}")
    if raw["format"] != FORMAT:
        raise _corrupt(path, number, f"format {raw['format']!r} is not {FORMAT}")
    numbers = ("noise_multiplier", "max_grad_norm", "sample_rate", "delta", "epsilon_round", "epsilon_total")
    for key in numbers:
        if not _is_number(raw[key]):
            raise _corrupt(path, number, f"{key} {raw[key]!r} is not a finite number")
    if not all(isinstance(raw[k], str) for k in ("time", "model_id", "data_fingerprint", "prev")):
        raise _corrupt(path, number, "time, model_id, data_fingerprint and prev must be strings")
    if not (isinstance(raw["steps"], int) and not isinstance(raw["steps"], bool) and raw["steps"] >= 1):
        raise _corrupt(path, number, f"steps {raw['steps']!r} is not an integer >= 1")
    if not (raw["noise_multiplier"] > 0 and raw["max_grad_norm"] > 0 and 0 < raw["sample_rate"] <= 1
            and 0 < raw["delta"] < 1):
        raise _corrupt(path, number, "sigma and C must be > 0, q in (0, 1] and delta in (0, 1)")
    if raw["budget"] is not None and not (_is_number(raw["budget"]) and raw["budget"] > 0):
        raise _corrupt(path, number, f"budget {raw['budget']!r} is not a number > 0 or null")
    return Record(**raw)


def parse(path: Path, content: bytes) -> Ledger:
    """Verify every record (hash chain, δ, recomputed ε); a torn last line is left out."""
    ledger = Ledger(Path(path), [], np.zeros(len(ORDERS)))
    lines = content.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    offset = 0
    for number, line in enumerate(complete + ([tail] if tail else []), start=1):
        is_tail = number > len(complete)
        try:
            raw = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            if is_tail:  # a write cut short by a crash: its round never started training
                break
            raise _corrupt(path, number, "not a JSON record") from None
        record = _check_record(ledger.path, number, raw)
        _verify(ledger, number, record)
        ledger.records.append(record)
        ledger.last_hash = hashlib.sha256(line).hexdigest()
        offset += len(line) + (0 if is_tail else 1)
        ledger.valid_size, ledger.needs_newline = offset, is_tail
    return ledger


def _verify(ledger: Ledger, number: int, record: Record) -> None:
    """The record follows the chain, keeps the ledger's δ, and its ε are what Opacus computes."""
    if record.prev != ledger.last_hash:
        raise _corrupt(ledger.path, number, "does not follow the record before it (a record was removed, "
                                            "reordered or changed)")
    if ledger.delta is not None and record.delta != ledger.delta:
        raise _corrupt(ledger.path, number,
                       f"delta {record.delta:g} differs from the ledger's {ledger.delta:g}")
    curve = round_rdp(record.noise_multiplier, record.sample_rate, record.steps)
    ledger.rdp_total = ledger.rdp_total + curve
    checks = (("epsilon_round", record.epsilon_round, epsilon(curve, record.delta)),
              ("epsilon_total", record.epsilon_total, epsilon(ledger.rdp_total, record.delta)))
    for name, stored, computed in checks:
        if not math.isclose(stored, computed, rel_tol=1e-9, abs_tol=1e-12):
            raise _corrupt(ledger.path, number,
                           f"{name} {stored!r} is not the {computed!r} that sigma, q, steps and delta give")


def read(path: str | Path) -> Ledger:
    """The verified ledger at ``path``; a missing file is empty (a node that never trained with DP)."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        content = b""
    except OSError as error:
        raise LedgerError(f"privacy ledger {path}: cannot be read: {error.strerror or error}") from None
    return parse(path, content)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[IO[bytes]]:
    """The ledger opened for appending, locked against another client charging the same file."""
    created = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if created:  # the new directory entry must survive a power cut too
            fsync_directory(path.parent)
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        handle.seek(0)
        yield handle


def charge(path: str | Path, *, model_id: str, data_fingerprint: str, noise_multiplier: float,
           max_grad_norm: float, sample_rate: float, steps: int, delta: float,
           budget: float | None) -> Record:
    """Append and fsync this round's record, or raise :class:`BudgetExceeded` and write nothing.

    Called before the round's first batch; when it returns, the charge survives any crash.
    """
    path = Path(path)
    with _locked(path) as handle:
        ledger = parse(path, handle.read())
        if ledger.delta is not None and delta != ledger.delta:
            raise LedgerError(f"privacy ledger {path}: kept at delta {ledger.delta:g}, but this node's "
                              f"MNIST_EDGE_DP_DELTA is {delta:g}; rounds at different delta do not compose "
                              "(set it back, or start a new ledger)")
        curve = round_rdp(noise_multiplier, sample_rate, steps)
        eps_round, eps_total = epsilon(curve, delta), epsilon(ledger.rdp_total + curve, delta)
        if not math.isfinite(eps_total):
            raise PrivacyError(f"dp_noise_multiplier {noise_multiplier:g} is too small to bound epsilon "
                               f"(sample rate {sample_rate:g}, {steps} steps)")
        if budget is not None and eps_total > budget:
            raise BudgetExceeded(
                f"privacy budget exceeded: spent epsilon {ledger.spent:.4f}, this round's epsilon "
                f"{eps_round:.4f} (total would be {eps_total:.4f}), budget epsilon {budget:g} at delta "
                f"{delta:g} (MNIST_EDGE_DP_EPSILON); refused before training, no update leaves this node")
        record = Record(FORMAT, datetime.now(UTC).isoformat(timespec="seconds"), str(model_id),
                        str(data_fingerprint), float(noise_multiplier), float(max_grad_norm),
                        float(sample_rate), int(steps), float(delta), eps_round, eps_total, budget,
                        ledger.last_hash)
        line = json.dumps(asdict(record), sort_keys=True).encode()
        os.ftruncate(handle.fileno(), ledger.valid_size)  # drop a torn tail before appending
        os.write(handle.fileno(), (b"\n" if ledger.needs_newline else b"") + line + b"\n")
        os.fsync(handle.fileno())
    return record


def describe(ledger: Ledger, budget: float | None) -> str:
    """The ledger as a table and the remaining budget: what ``python -m mnist_edge privacy`` prints."""
    lines = [f"privacy ledger {ledger.path}: {len(ledger.records)} charged round(s)"]
    if ledger.records:
        lines.append(f"{'time':<25} {'model_id':<36} {'sigma':>7} {'C':>6} {'q':>8} {'steps':>6} "
                     f"{'eps_round':>9} {'eps_total':>9}")
        for r in ledger.records:
            lines.append(f"{r.time:<25} {r.model_id[:36]:<36} {r.noise_multiplier:>7.4g} "
                         f"{r.max_grad_norm:>6.3g} {r.sample_rate:>8.4g} {r.steps:>6} "
                         f"{r.epsilon_round:>9.4f} {r.epsilon_total:>9.4f}")
        lines.append(f"delta {ledger.delta:g}; epsilon spent {ledger.spent:.4f}")
    if budget is None:
        lines.append("budget: none (MNIST_EDGE_DP_EPSILON is not set): DP runs only when a round asks for it")
    else:
        lines.append(f"budget epsilon {budget:g}; remaining {max(budget - ledger.spent, 0.0):.4f}")
    return "\n".join(lines)

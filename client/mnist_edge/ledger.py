"""The node's privacy ledger: one JSON line per charged round, appended and fsync'd before training.

Why an append-only log: a ``kill -9`` at any instant must neither lose a charge nor corrupt the
file. A record is one line, written in full, fsync'd and read back before the round's first batch
(:mod:`mnist_edge.ledger_store`), so a round either has its whole record (charged, even if it then
crashed: the node cannot know what leaked) or an unparsable fragment at the end, a torn write,
which is dropped because training never began for it. A whole record whose newline was cut or
damaged still counts. Each line carries the sha256 of the line before it, and every ε is
recomputed from σ, q, steps and δ, so a hand edit, a reordered record or a flipped bit fails the
next train task loudly instead of silently resetting the budget; the head beside the ledger
catches records removed from its end, and lets a charge recompute only what came after it.

Accounting is Opacus's RDP accountant (``RDPAccountant``: its orders, ``compute_rdp`` and
``get_privacy_spent``); rounds compose by adding their RDP curves, so the total is tighter than
the sum of the rounds' ε and never decreases.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import ledger_store as store
from .accounting import ORDERS, epsilon, round_rdp  # noqa: F401  (the ledger's arithmetic, used from here too)
from .ledger_store import ChargeFailed, Head, LedgerError, PrivacyError  # noqa: F401  (raised from here too)

FORMAT = 1


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


@dataclass
class Ledger:
    """The charged rounds of one ledger file, verified."""

    path: Path
    records: list[Record] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)  # sha256 of each record's line
    rdp_total: np.ndarray = field(default_factory=lambda: np.zeros(len(ORDERS)))
    valid_size: int = 0  # bytes up to the end of the last record's JSON; a torn tail lies beyond
    needs_newline: bool = False  # the last record's newline was cut or damaged
    recomputed: int = 0  # records whose ε this read recomputed (the others: the head's checkpoint)
    skipped: int = 0  # records before ``records[0]``: covered by the checkpoint and not parsed (a charge)

    @property
    def count(self) -> int:
        return self.skipped + len(self.records)

    @property
    def spent(self) -> float:
        return self.records[-1].epsilon_total if self.records else 0.0

    @property
    def delta(self) -> float | None:
        return self.records[-1].delta if self.records else None  # one δ throughout: checked record by record

    @property
    def last_hash(self) -> str:
        return self.hashes[-1] if self.hashes else ""

    @property
    def end(self) -> int:
        """Where the next record goes: after the last record's newline (what lies beyond is cut)."""
        return self.valid_size + (0 if self.needs_newline or not self.records else 1)


@dataclass(frozen=True)
class Charged:
    """A charge on disk: its record, and the ledger's head after it (what each DP update reports)."""

    record: Record
    records: int  # records in the ledger, this one included
    head: str  # sha256 of this record's line


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


def _line_record(path: Path, number: int, line: bytes) -> Record:
    try:
        raw = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, number, "not a JSON record") from None
    return _check_record(path, number, raw)


def _follow(ledger: Ledger, number: int, record: Record, line: bytes) -> None:
    """Append a record that follows the chain and keeps the ledger's δ."""
    if record.prev != ledger.last_hash:
        raise _corrupt(ledger.path, number, "does not follow the record before it (a record was removed, "
                                            "reordered or changed)")
    if ledger.delta is not None and record.delta != ledger.delta:
        raise _corrupt(ledger.path, number,
                       f"delta {record.delta:g} differs from the ledger's {ledger.delta:g}")
    ledger.records.append(record)
    ledger.hashes.append(store.sha256(line))


def _verify(ledger: Ledger, number: int, record: Record, line: bytes) -> None:
    """Append a record whose ε are what Opacus computes from its σ, q, steps and δ."""
    _follow(ledger, number, record, line)
    try:
        curve = round_rdp(record.noise_multiplier, record.sample_rate, record.steps)
    except PrivacyError as error:
        raise _corrupt(ledger.path, number, str(error)) from None
    ledger.rdp_total = ledger.rdp_total + curve
    ledger.recomputed += 1
    checks = (("epsilon_round", record.epsilon_round, epsilon(curve, record.delta)),
              ("epsilon_total", record.epsilon_total, epsilon(ledger.rdp_total, record.delta)))
    for name, stored, computed in checks:
        if not math.isclose(stored, computed, rel_tol=1e-9, abs_tol=1e-12):
            raise _corrupt(ledger.path, number,
                           f"{name} {stored!r} is not the {computed!r} that sigma, q, steps and delta give")


def _covers(head: Head, content: bytes) -> bool:
    """The head's checkpoint applies: the ledger still begins with the very bytes it was made from."""
    return (head.orders == list(ORDERS) and head.size <= len(content)
            and content[head.size:head.size + 1] in (b"", b"\n")
            and store.sha256(content[:head.size]) == head.prefix_sha256)


def _from_checkpoint(ledger: Ledger, prefix: bytes, head: Head, every_record: bool) -> None:
    """The records the checkpoint covers, not recomputed: their composed curve is the head's.

    ``every_record``: parse and chain them all (to show them); else only the last is parsed (a
    charge needs its hash, ε and δ), the bytes before it being the ones the head was made from.
    """
    start = 0 if every_record else prefix.rfind(b"\n") + 1
    ledger.skipped = prefix.count(b"\n", 0, start)
    for number, line in enumerate(prefix[start:].split(b"\n"), start=ledger.skipped + 1):
        record = _line_record(ledger.path, number, line)
        if ledger.records or not ledger.skipped:
            _follow(ledger, number, record, line)
        else:  # the first one parsed follows records that were not
            ledger.records.append(record)
            ledger.hashes.append(store.sha256(line))
    agrees = (ledger.count, ledger.last_hash, ledger.spent, ledger.delta) == \
        (head.records, head.last_hash, head.epsilon_spent, head.delta)
    if not (agrees and math.isclose(epsilon(np.asarray(head.rdp), head.delta), head.epsilon_spent,
                                    rel_tol=1e-9, abs_tol=1e-12)):
        raise store.corrupt_head(store.head_path(ledger.path), "its checkpoint does not match the ledger's "
                                                               "records it covers")
    ledger.rdp_total = np.asarray(head.rdp, dtype=float)
    ledger.valid_size = head.size


def _scan(ledger: Ledger, content: bytes, begin: int) -> None:
    """Verify every record from ``begin``; after the last newline, whole records count and a fragment is torn."""
    *complete, tail = content[begin:].split(b"\n")
    offset = begin
    for line in complete:
        number = ledger.count + 1
        _verify(ledger, number, _line_record(ledger.path, number, line), line)
        ledger.valid_size, ledger.needs_newline = offset + len(line), False
        offset += len(line) + 1
    text, position = tail.decode("latin-1"), 0  # one character a byte: positions are byte offsets
    while position < len(text):
        try:
            raw, end = json.JSONDecoder().raw_decode(text, position)
        except json.JSONDecodeError:
            return  # an unparsable fragment: a write cut short, whose round never started training
        number = ledger.count + 1
        _verify(ledger, number, _check_record(ledger.path, number, raw), tail[position:end])
        ledger.valid_size, ledger.needs_newline = offset + end, True
        position = end + 1  # past the record's cut or damaged newline


def _anchor(ledger: Ledger, head: Head) -> None:
    """The ledger still holds the record its head ends with: nothing was removed from its end."""
    index = head.records - 1 - ledger.skipped  # below 0: a record the checkpoint itself covered
    if ledger.count >= head.records and (index < 0 or ledger.hashes[index] == head.last_hash):
        return
    raise LedgerError(
        f"privacy ledger {ledger.path}: holds {ledger.count} record(s), but its head "
        f"{store.head_path(ledger.path)} was written after record {head.records} (epsilon spent "
        f"{head.epsilon_spent:.4f}, sha256 {head.last_hash[:16]}...): records were removed or the ledger was "
        "replaced, which would roll the budget back. It is never reset automatically: restore the ledger "
        "from a backup, or (the node's operator only) move both files away to start a new budget")


def parse(path: Path, content: bytes, head: Head | None = None, *, checkpoint: bool = True,
          every_record: bool = True) -> Ledger:
    """Verify the ledger's bytes: chain, δ, ε (from the head's checkpoint on, if it applies), anchor.

    ``every_record`` False: the records the checkpoint covers are not parsed (see ``Ledger.skipped``).
    """
    ledger = Ledger(Path(path))
    begin = 0
    if head is not None and checkpoint and _covers(head, content):
        _from_checkpoint(ledger, content[:head.size], head, every_record)
        ledger.needs_newline = content[head.size:head.size + 1] != b"\n"
        begin = head.size + (0 if ledger.needs_newline else 1)
    _scan(ledger, content, begin)
    if head is not None:
        _anchor(ledger, head)
    return ledger


def read(path: str | Path, *, full: bool = False) -> Ledger:
    """The verified ledger at ``path``; a missing file is empty (a node that never trained with DP).

    ``full``: recompute every record's ε, ignoring the head's checkpoint (it is still the anchor).
    """
    path = Path(path)
    with store.locked(path, charge=False) as fd:
        head = store.read_head(path)
        if fd is None and head is not None and path.exists():
            return read(path, full=full)  # a first charge wrote both since the ledger was looked for
        return parse(path, b"" if fd is None else store.read_all(fd), head, checkpoint=not full)


def charge(path: str | Path, *, model_id: str, data_fingerprint: str, noise_multiplier: float,
           max_grad_norm: float, sample_rate: float, steps: int, delta: float,
           budget: float | None) -> Charged:
    """Append this round's record durably and update the head, or raise and train nothing.

    Raises :class:`BudgetExceeded` (nothing written), :class:`LedgerError` (the ledger needs a
    person) or :class:`ChargeFailed` (the disk refused: nothing charged). Called before the round's
    first batch; when it returns, the charge survives any crash.
    """
    path = Path(path)
    curve = round_rdp(noise_multiplier, sample_rate, steps)  # the slow part, before taking the lock
    with store.locked(path, charge=True) as fd:
        content = store.read_all(fd)
        ledger = parse(path, content, store.read_head(path), every_record=False)
        if ledger.delta is not None and delta != ledger.delta:
            raise LedgerError(f"privacy ledger {path}: kept at delta {ledger.delta:g}, but this node's "
                              f"MNIST_EDGE_DP_DELTA is {delta:g}; rounds at different delta do not compose "
                              "(set it back, or start a new ledger)")
        total = ledger.rdp_total + curve
        eps_round, eps_total = epsilon(curve, delta), epsilon(total, delta)
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
        keep, data = ledger.end, (b"\n" if ledger.needs_newline else b"") + line + b"\n"
        store.append(fd, path, keep, data)
        store.write_head(path, Head(ledger.count + 1, keep + len(data) - 1,
                                    store.sha256(content[:keep] + data[:-1]), store.sha256(line), eps_total,
                                    float(delta), list(ORDERS), total.tolist()))
    return Charged(record, ledger.count + 1, store.sha256(line))

"""The ledger under a hostile disk: short writes, full filesystems, damaged tails, rollbacks, FIFOs.

Real files, a real 16 KiB tmpfs (where the sandbox lets root mount one), a real ``RLIMIT_FSIZE``
in a child process, real FIFOs and devices, and the real EdgeClient for the rounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mnist_edge import accounting, ledger, ledger_store
from mnist_edge.node import LEDGER_NAME, STATE_DIR
from test_edge import call, seed_model, start

CHARGE = dict(model_id="m", data_fingerprint="f", max_grad_norm=1.0, delta=1e-5, budget=None)
PAGE = 4096


def charge(path: Path, sigma: float = 1.0, **changes) -> ledger.Charged:
    return ledger.charge(path, noise_multiplier=sigma, sample_rate=0.1, steps=10, **{**CHARGE, **changes})


def env_client(tmp_path, monkeypatch, node_dir, epsilon: float = 50.0):
    monkeypatch.setenv("MNIST_EDGE_DP_EPSILON", repr(epsilon))
    monkeypatch.setenv("MNIST_EDGE_DP_ROUNDS", "1000")  # the tests charge many records before the node's rounds
    return start(tmp_path, monkeypatch, node_dir)


def train(client, seed_path, settings=None) -> dict:
    _, meta = call(client, client.train_callback, seed_model(seed_path), settings or {"batch_size": 500})
    return meta["training_metadata"]


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A real tmpfs of ``size`` mounted at ``where``; skips where this sandbox cannot mount one."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    """Take every free page of the filesystem ``directory`` is on."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"x" * PAGE)
    return filler


# -- A charge is durable before training starts, or the round fails before training -----------------


def test_a_short_write_on_a_full_filesystem_fails_the_round_before_any_training(
        tmp_path, monkeypatch, node_dir, seed_path):
    """The last free bytes fall inside the record: the write is cut short (a real short write on a
    tmpfs), the round fails naming the ledger, no batch runs, no update leaves, and the ledger is
    as it was; with space back, the next round is charged after the old records."""
    state = node_dir / STATE_DIR
    path = state / LEDGER_NAME
    with tmpfs(state, "16k"):
        records = 0
        while True:  # until less room is left in the ledger's last page than a round's record takes
            charge(path, 1.0 + records / 100)  # ~300 bytes each; the edge round's record is ~390
            records += 1
            if path.stat().st_size % PAGE > PAGE - 350:
                break
        before = path.read_bytes()
        filler = fill(state)
        client, runtime = env_client(tmp_path, monkeypatch, node_dir)

        with pytest.raises(ledger.ChargeFailed) as failed:
            train(client, seed_path)
        message = str(failed.value)
        match = re.search(r"\(No space left on device; (\d+) of (\d+) bytes written, then cut back\)", message)
        assert message.startswith(f"privacy ledger {path}: this round's charge could not be written")
        assert match and 0 < int(match[1]) < int(match[2]), message  # the kernel wrote part of it
        assert "the round is not charged, no training ran and no update leaves this node" in message
        assert runtime.checks == 0 and not runtime.metrics  # not one batch
        assert path.read_bytes() == before and ledger.read(path, full=True).count == records

        filler.unlink()
        meta = train(client, seed_path)
        assert meta["dp_ledger_records"] == records + 1 == ledger.read(path, full=True).count


def test_a_read_only_ledger_directory_fails_the_round_before_training_naming_the_ledger(
        tmp_path, monkeypatch, node_dir, seed_path):
    state = node_dir / STATE_DIR
    with tmpfs(state, "16k"):
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        client, runtime = env_client(tmp_path, monkeypatch, node_dir)
        with pytest.raises(ledger.ChargeFailed) as failed:
            train(client, seed_path)
        assert str(failed.value) == (
            f"privacy ledger {state / LEDGER_NAME}: cannot be opened to charge this round (Read-only file system); "
            "refused before training, no update leaves this node")
        assert runtime.checks == 0 and not (state / LEDGER_NAME).exists()


CUT_CHARGE = """
import json, resource, sys
from pathlib import Path
import numpy as np
from mnist_edge import privacy
from mnist_edge.model import new_model
from mnist_edge.node import PrivacyLimits
from mnist_edge.settings import parse_settings
path, limit, shard = Path(sys.argv[1]), int(sys.argv[2]), np.load(sys.argv[3])
limits = PrivacyLimits(epsilon=50.0, ledger=path)
settings = parse_settings({"batch_size": 50, "dp_noise_multiplier": 1.5})
plan = privacy.plan_round(settings, len(shard["labels"]), limits)
batches = []
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    privacy.train_round(new_model(0), shard["images"], shard["labels"], plan, limits, model_id="m",
                        data_fingerprint="f", on_batch=lambda: batches.append(1))
    print(json.dumps({"error": None, "batches": len(batches)}))
except privacy.PrivacyError as error:
    print(json.dumps({"error": str(error), "kind": type(error).__name__, "batches": len(batches)}))
"""


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_file_size_limit_inside_the_record_fails_the_round_before_training(tmp_path, mnist5k):
    """RLIMIT_FSIZE 100 bytes past the ledger's end: the kernel writes exactly 100 bytes of the
    record and refuses the rest (EFBIG); the round fails naming the ledger, trains nothing, and
    the ledger still verifies with what it had."""
    images, labels = mnist5k
    shard = tmp_path / "shard.npz"
    np.savez(shard, images=images[:200], labels=labels[:200])
    path = tmp_path / "node" / LEDGER_NAME
    charge(path)
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", CUT_CHARGE, str(path), str(len(before) + 100), str(shard)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["kind"] == "ChargeFailed" and outcome["batches"] == 0, outcome
    assert re.match(rf"privacy ledger {re.escape(str(path))}: this round's charge could not be written "
                    r"\(File too large; 100 of \d+ bytes written, then cut back\)", outcome["error"])
    assert path.read_bytes() == before and ledger.read(path, full=True).count == 1


# -- A parsable, chain-valid last record is kept; removing records is detected --------------------------


@pytest.mark.parametrize("damage", [b"", b"\x0b", b"\x8a", b" "], ids=["cut", "flipped-vt", "flipped-bit7", "space"])
def test_a_whole_last_record_with_a_cut_or_damaged_newline_stays_charged(tmp_path, damage):
    path = tmp_path / LEDGER_NAME
    charged = [charge(path, s) for s in (1.0, 2.0, 1.5)]
    path.write_bytes(path.read_bytes()[:-1] + damage)
    for full in (False, True):
        found = ledger.read(path, full=full)
        assert [r.epsilon_total for r in found.records] == [c.record.epsilon_total for c in charged]
    fourth = charge(path, 3.0)
    assert fourth.records == 4 and fourth.record.prev == charged[-1].head
    text = path.read_bytes()
    *lines, last = text.split(b"\n")
    assert last == b"" and len(lines) == 4 and all(line.endswith(b"}") and json.loads(line) for line in lines)
    assert ledger.read(path, full=True).count == 4


def test_a_torn_fragment_after_the_last_record_is_dropped_but_nothing_before_it(tmp_path):
    path = tmp_path / LEDGER_NAME
    charge(path)
    line = path.read_bytes()
    path.write_bytes(line[:-1] + b"\x0b" + line[: len(line) // 2])  # damaged newline, then a cut write
    assert ledger.read(path).count == 1
    assert charge(path, 2.0).records == 2 and ledger.read(path, full=True).count == 2


def _older_copy(path: Path, keep: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:keep]))


@pytest.mark.parametrize("rollback,kept", [
    (lambda p: _older_copy(p, 2), 2),  # the last record removed
    (lambda p: _older_copy(p, 1), 1),  # an older backup restored
    (lambda p: p.unlink(), 0),  # the ledger deleted, its head left
], ids=["last-removed", "backup-restored", "ledger-deleted"])
def test_records_removed_from_the_end_are_detected_by_the_head(tmp_path, rollback, kept):
    path = tmp_path / LEDGER_NAME
    spent = [charge(path, s) for s in (1.0, 2.0, 1.5)][-1].record.epsilon_total
    rollback(path)
    message = (rf"privacy ledger {re.escape(str(path))}: holds {kept} record\(s\), but its head "
               rf"{re.escape(str(ledger_store.head_path(path)))} was written after record 3 \(epsilon spent "
               rf"{spent:.4f}.*records were removed or the ledger was replaced")
    for full in (False, True):
        with pytest.raises(ledger.LedgerError, match=message):
            ledger.read(path, full=full)
    after = path.read_bytes() if path.exists() else b""
    with pytest.raises(ledger.LedgerError, match=message):
        charge(path)
    assert (path.read_bytes() if path.exists() else b"") == after  # nothing charged over it


def test_what_the_node_cannot_see_the_server_does(tmp_path, monkeypatch, node_dir, seed_path):
    """Removing the ledger and its head together starts a new budget locally (nothing on the node
    remembers); every DP update carries the ledger's head, so the server sees the count and the
    spent epsilon go back."""
    client, _ = env_client(tmp_path, monkeypatch, node_dir)
    first, second = train(client, seed_path), train(client, seed_path)
    assert (first["dp_ledger_records"], second["dp_ledger_records"]) == (1, 2)
    lines = (node_dir / STATE_DIR / LEDGER_NAME).read_bytes().splitlines()
    assert second["dp_ledger_head"] == ledger_store.sha256(lines[1])  # the hash of its own record
    shutil.rmtree(node_dir / STATE_DIR)
    third = train(client, seed_path)
    assert third["dp_ledger_records"] == 1 and third["dp_epsilon_spent"] < second["dp_epsilon_spent"]


# -- Verification is incremental -----------------------------------------------------------------------


@pytest.fixture
def counted_curves(monkeypatch):
    """How many RDP curves the accountant computes (the slow part of verifying a record)."""
    calls = []
    real = accounting.rdp_analysis.compute_rdp

    def counting(**kwargs):
        calls.append(kwargs["noise_multiplier"])
        return real(**kwargs)

    monkeypatch.setattr(accounting.rdp_analysis, "compute_rdp", counting)
    accounting._rdp.cache_clear()
    yield calls
    accounting._rdp.cache_clear()


def test_a_charge_recomputes_only_its_own_round_and_a_read_none(tmp_path, counted_curves):
    path = tmp_path / LEDGER_NAME
    for i in range(12):
        charge(path, 1.0 + i / 10)
    accounting._rdp.cache_clear()
    counted_curves.clear()
    assert ledger.read(path).count == 12 and counted_curves == []
    charge(path, 5.0)
    assert counted_curves == [5.0]  # the new round; the twelve before come from the head's checkpoint

    accounting._rdp.cache_clear()
    counted_curves.clear()
    assert ledger.read(path, full=True).recomputed == 13 and len(counted_curves) == 13
    ledger_store.head_path(path).unlink()  # a ledger from before heads: verified in full, once
    accounting._rdp.cache_clear()
    counted_curves.clear()
    charge(path, 6.0)
    assert len(counted_curves) == 14
    counted_curves.clear()
    charge(path, 6.0)
    assert counted_curves == []  # the head the last charge wrote, and a cached curve


def test_privacy_full_recomputes_what_the_checkpoint_covers(tmp_path):
    path = tmp_path / LEDGER_NAME
    for sigma in (1.0, 2.0, 1.5):
        charge(path, sigma)
    for flags, recomputed in (([], 0), (["--full"], 3)):
        done = subprocess.run([sys.executable, "-m", "mnist_edge", "privacy", "--ledger", str(path), *flags],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"(epsilon recomputed for {recomputed} record(s), the rest from the head's checkpoint)" in done.stdout


def test_an_edit_under_the_checkpoint_is_still_found_and_named(tmp_path):
    path = tmp_path / LEDGER_NAME
    for sigma in (1.0, 2.0, 1.5, 3.0):
        charge(path, sigma)
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    record["epsilon_total"] /= 2
    lines[1] = json.dumps(record, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ledger.LedgerError, match=r"line 2: epsilon_total .* is not the"):
        ledger.read(path)


@pytest.mark.parametrize("edit,what", [
    (lambda h: {**h, "rdp": [v / 2 for v in h["rdp"]]}, "its checkpoint does not match"),
    (lambda h: {**h, "epsilon_spent": h["epsilon_spent"] / 2}, "its checkpoint does not match"),
    (lambda h: {**h, "records": h["records"] + 5}, "its checkpoint does not match"),
    (lambda h: {**h, "extra": 1}, "expected a JSON object with the keys"),
    (lambda h: {**h, "rdp": [float("nan")] * len(h["rdp"])}, "finite numbers"),
], ids=["lower-curve", "lower-spent", "more-records", "extra-key", "nan"])
def test_a_head_that_does_not_match_its_ledger_is_refused(tmp_path, edit, what):
    path = tmp_path / LEDGER_NAME
    for sigma in (1.0, 2.0):
        charge(path, sigma)
    head = ledger_store.head_path(path)
    head.write_text(json.dumps(edit(json.loads(head.read_text()))))
    before = path.read_bytes()
    for action in (lambda: ledger.read(path), lambda: charge(path)):
        with pytest.raises(ledger.LedgerError, match=f"privacy ledger head {re.escape(str(head))}: .*{what}"):
            action()
    assert path.read_bytes() == before


# -- Non-regular files are refused without blocking --------------------------------------------------


def test_privacy_on_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "ledger.fifo"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "mnist_edge", "privacy", "--ledger", str(fifo)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stderr == f"error: privacy ledger {fifo} cannot be read: it is a FIFO, not a regular file; " \
                          "refused without reading it\n"


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "head-fifo"])
def test_a_ledger_that_is_not_a_regular_file_is_refused_to_read_and_to_charge(tmp_path, kind):
    path = tmp_path / LEDGER_NAME
    if kind == "fifo":
        os.mkfifo(path)
        what = "a FIFO"
    elif kind == "directory":
        path.mkdir()
        what = "a directory"
    elif kind == "device":
        path = Path("/dev/null")
        what = "a character device"
    else:
        charge(path)
        os.unlink(ledger_store.head_path(path))
        os.mkfifo(ledger_store.head_path(path))
        what = "a FIFO"
    named = ledger_store.head_path(path) if kind == "head-fifo" else path
    pattern = rf"{re.escape(str(named))} cannot be read: it is {what}"
    script = textwrap.dedent(f"""
        from mnist_edge import ledger
        for action in (lambda: ledger.read({str(path)!r}), lambda: ledger.charge({str(path)!r}, model_id="m",
                data_fingerprint="f", noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=10,
                delta=1e-5, budget=None)):
            try:
                action()
                print("ACCEPTED")
            except ledger.LedgerError as error:
                print("REFUSED", error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 2, done.stderr
    assert all(line.startswith("REFUSED") and re.search(pattern, line) for line in lines), lines

"""The privacy ledger: durable across restarts and kill -9, verified on every read, exact ε.

Real processes (``python -m mnist_edge train`` / ``privacy``) and real ``SIGKILL``; expected ε
values come from Opacus's ``RDPAccountant``, not from the code under test.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from mnist_edge import data, ledger
from mnist_edge.node import LEDGER_NAME

CHARGE = dict(model_id="m", data_fingerprint="f", max_grad_norm=1.0, delta=1e-5, budget=None)


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float = 1e-5) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta)


def mnist_edge(*args: object, cwd: Path, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "mnist_edge", *map(str, args)], cwd=cwd, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


@pytest.fixture
def shard(tmp_path, mnist5k) -> Path:
    images, labels = mnist5k
    pick = np.random.default_rng(3).permutation(len(labels))[:200]
    return data.write_shard(tmp_path / "train.csv", images[pick], labels[pick], pick)


def test_the_spent_budget_survives_a_restart_and_refuses_the_round_after_the_plan(tmp_path, shard):
    path = tmp_path / "node" / LEDGER_NAME
    budget = {"MNIST_EDGE_DP_EPSILON": "2.5", "MNIST_EDGE_DP_ROUNDS": "2"}
    code, out, err = finish(mnist_edge("train", "--model", tmp_path / "a.pth", "--batch-size", 50,
                                       "--ledger", path, shard, cwd=tmp_path, env=budget))
    assert code == 0, err
    meta = json.loads((tmp_path / "a.xdata-meta.json").read_text())
    one = opacus_epsilon([(meta["dp_noise_multiplier"], 0.25, 4)])
    assert meta["dp_steps"] == 4 and meta["dp_epsilon_spent"] == pytest.approx(one, rel=1e-12)
    assert meta["dp_rounds_left"] == 1

    code, out, err = finish(mnist_edge("privacy", "--ledger", path, cwd=tmp_path, env=budget))
    assert code == 0, err
    assert "1 charged round(s)" in out and f"epsilon spent {one:.4f}" in out
    assert f"remaining {2.5 - one:.4f}" in out and "planned DP rounds left: 1 of 2" in out

    code, out, err = finish(mnist_edge("train", "--model", tmp_path / "b.pth", "--batch-size", 50,
                                       "--ledger", path, shard, cwd=tmp_path, env=budget))
    assert code == 0, err
    assert json.loads((tmp_path / "b.xdata-meta.json").read_text())["dp_epsilon_spent"] == pytest.approx(2.5, 2e-3)
    code, out, err = finish(mnist_edge("train", "--model", tmp_path / "c.pth", "--batch-size", 50,
                                       "--ledger", path, shard, cwd=tmp_path, env=budget))
    assert code == 2 and "error: no planned DP round is left (budget epsilon 2.5)" in err, err
    assert not (tmp_path / "c.pth").exists()
    assert len(ledger.read(path).records) == 2


def test_kill_9_in_the_middle_of_a_round_keeps_its_charge(tmp_path, shard):
    path = tmp_path / LEDGER_NAME
    # batch_size 1 on 200 images: 200 steps an epoch, 20 epochs; far longer than the wait below.
    process = mnist_edge("train", "--model", tmp_path / "killed.pth", "--batch-size", 1, "--epochs", 20,
                         "--dp-noise-multiplier", 1.0, "--ledger", path, shard, cwd=tmp_path,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (path.exists() and path.read_bytes().endswith(b"\n")):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.1)
        time.sleep(1.0)  # training under way
        assert process.poll() is None
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    assert process.returncode == -signal.SIGKILL and not (tmp_path / "killed.pth").exists()
    [record] = ledger.read(path).records
    assert record.steps == 4000 and record.epsilon_round == pytest.approx(opacus_epsilon([(1.0, 1 / 200, 4000)]))

    code, out, err = finish(mnist_edge("train", "--model", tmp_path / "next.pth", "--batch-size", 100,
                                       "--dp-noise-multiplier", 2.0, "--ledger", path, shard, cwd=tmp_path))
    assert code == 0, err
    records = ledger.read(path).records
    assert len(records) == 2 and records[1].epsilon_total == pytest.approx(
        opacus_epsilon([(1.0, 1 / 200, 4000), (2.0, 0.5, 2)]), rel=1e-12)


CHARGER = """
import sys
from mnist_edge import ledger
i = 0
while True:
    ledger.charge(sys.argv[1], model_id=f"m{i}", data_fingerprint="f", noise_multiplier=1.0 + i % 3,
                  max_grad_norm=1.0, sample_rate=0.05, steps=20, delta=1e-5, budget=None)
    print(i, flush=True)  # this charge is on disk
    i += 1
"""


def test_kill_9_at_random_instants_never_loses_a_charge_nor_corrupts_the_ledger(tmp_path):
    path, confirmed = tmp_path / LEDGER_NAME, 0
    rng = random.Random(12)
    for _ in range(5):
        log = tmp_path / "charged.txt"
        with open(log, "w") as out:
            process = subprocess.Popen([sys.executable, "-c", CHARGER, str(path)], stdout=out,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 120
            while not log.read_text().strip():  # importing torch takes seconds
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(30)
        confirmed += len(log.read_text().split())
        records = ledger.read(path).records  # raises if the kill left anything but a torn tail
        assert confirmed <= len(records) <= confirmed + 5
        confirmed = len(records)  # a charge written but not yet reported still counts
    totals = [r.epsilon_total for r in records]
    sigmas = [1.0 + int(r.model_id[1:]) % 3 for r in records]  # RDP is linear in steps: group equal rounds
    history = [(s, 0.05, 20 * sigmas.count(s)) for s in sorted(set(sigmas))]
    assert totals == sorted(totals) and totals[-1] == pytest.approx(opacus_epsilon(history), rel=1e-9)


# -- what reading the ledger checks -------------------------------------------------------------


def charged(path: Path, sigmas: tuple[float, ...] = (1.0, 2.0, 1.5)) -> list[ledger.Record]:
    return [ledger.charge(path, noise_multiplier=s, sample_rate=0.1, steps=10, **CHARGE).record for s in sigmas]


def test_the_charged_epsilon_is_what_opacus_accountant_gives(tmp_path):
    path = tmp_path / LEDGER_NAME
    rounds = [(1.0, 0.064, 15), (0.8, 0.2, 5), (3.0, 1.0, 2)]
    records = [ledger.charge(path, noise_multiplier=s, sample_rate=q, steps=t, **CHARGE).record for s, q, t in rounds]
    for i, (record, mechanism) in enumerate(zip(records, rounds, strict=True)):
        assert (record.noise_multiplier, record.sample_rate, record.steps, record.delta) == (*mechanism, 1e-5)
        assert record.epsilon_round == pytest.approx(opacus_epsilon([mechanism]), rel=1e-12)
        assert record.epsilon_total == pytest.approx(opacus_epsilon(rounds[: i + 1]), rel=1e-12)
    assert records[-1].epsilon_total < sum(r.epsilon_round for r in records)  # RDP composes sublinearly
    assert ledger.read(path).records == records


def test_a_charge_over_the_budget_writes_nothing(tmp_path):
    path = tmp_path / LEDGER_NAME
    [first] = charged(path, (1.0,))
    before = path.read_bytes()
    with pytest.raises(ledger.BudgetExceeded, match=f"spent epsilon {first.epsilon_total:.4f}"):
        ledger.charge(path, noise_multiplier=1.0, sample_rate=0.1, steps=10,
                      **{**CHARGE, "budget": first.epsilon_total * 1.01})
    assert path.read_bytes() == before


def test_a_torn_last_line_is_dropped_and_cut_off_by_the_next_charge(tmp_path):
    path = tmp_path / LEDGER_NAME
    charged(path, (1.0,))
    whole = path.read_bytes()
    path.write_bytes(whole + whole[: len(whole) // 2])  # a crash in the middle of the next write
    assert len(ledger.read(path).records) == 1
    charged(path, (2.0,))
    lines = path.read_bytes().split(b"\n")
    assert lines[0] + b"\n" == whole and lines[2] == b"" and len(ledger.read(path).records) == 2


def test_a_whole_last_record_without_its_newline_still_counts(tmp_path):
    path = tmp_path / LEDGER_NAME
    charged(path, (1.0, 2.0))
    path.write_bytes(path.read_bytes()[:-1])
    assert len(ledger.read(path).records) == 2
    charged(path, (1.5,))
    assert len(ledger.read(path).records) == 3


def _edit(lines: list[dict], how: str) -> list[dict]:
    if how == "lower total":
        lines[1]["epsilon_total"] /= 2
    elif how == "more noise":
        lines[2]["noise_multiplier"] = 10.0
    elif how == "fewer steps":
        lines[0]["steps"] = 1
    elif how == "other delta":
        lines[2]["delta"] = 1e-3
    elif how == "removed":
        del lines[1]
    elif how == "reordered":
        lines[1], lines[2] = lines[2], lines[1]
    elif how == "extra key":
        lines[0]["note"] = "x"
    return lines


@pytest.mark.parametrize("how,line,what", [
    ("lower total", 2, "epsilon_total .* is not the"),
    ("more noise", 3, "epsilon_round .* is not the"),
    ("fewer steps", 1, "epsilon_round .* is not the"),
    ("other delta", 3, "does not follow|delta"),
    ("removed", 2, "does not follow the record before it"),
    ("reordered", 2, "does not follow the record before it"),
    ("extra key", 1, "expected a JSON object with the keys"),
])
def test_an_edited_ledger_is_refused_naming_the_line(tmp_path, how, line, what):
    path = tmp_path / LEDGER_NAME
    charged(path)
    records = [json.loads(text) for text in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in _edit(records, how)))
    with pytest.raises(ledger.LedgerError, match=f"{path}: line {line}: ({what}).*never reset automatically"):
        ledger.read(path)
    with pytest.raises(ledger.LedgerError):
        ledger.charge(path, noise_multiplier=1.0, sample_rate=0.1, steps=10, **CHARGE)


@pytest.mark.parametrize("garbage", [b"not json\n", b"\n", b"[1, 2]\n", b"\xff\xfe\n"])
def test_garbage_before_the_last_line_is_corruption_not_a_torn_tail(tmp_path, garbage):
    path = tmp_path / LEDGER_NAME
    charged(path, (1.0,))
    path.write_bytes(garbage + path.read_bytes())
    with pytest.raises(ledger.LedgerError, match="line 1:"):
        ledger.read(path)


def test_a_node_that_changed_its_delta_cannot_charge_the_old_ledger(tmp_path):
    path = tmp_path / LEDGER_NAME
    charged(path, (1.0,))
    with pytest.raises(ledger.LedgerError, match="kept at delta 1e-05, but this node's MNIST_EDGE_DP_DELTA is 0.001"):
        ledger.charge(path, noise_multiplier=1.0, sample_rate=0.1, steps=10, **{**CHARGE, "delta": 1e-3})


def test_a_missing_ledger_is_empty_and_an_unreadable_one_is_an_error(tmp_path):
    assert ledger.read(tmp_path / "none.jsonl").records == []
    with pytest.raises(ledger.LedgerError, match="cannot be read"):
        ledger.read(tmp_path)  # a directory

"""What reading and charging the privacy ledger cost as it grows: full verification against the head's checkpoint.

Builds a ledger of ``--records`` rounds (each with its own σ, so no two RDP curves are alike, the
worst case for the accountant's cache), then times, in this process with the curve cache cleared
before each run (as a freshly started client or command finds it):

- ``read, full verification``: every record's ε recomputed (``privacy --full``; what every read
  and every charge did before the head existed);
- ``read, from the checkpoint``: the records the head covers are hashed, not recomputed;
- ``charge, no head``: a ledger without a head (one written before heads), all records recomputed
  under the lock;
- ``charge of a train task``: from the checkpoint, the round's curve already computed (cached) by
  ``plan_round``, so only the new record is accounted under the lock;
- ``charge, round curve not cached``: the same with the new round's curve computed inside.

``--baseline REV`` also times the ``ledger`` module of git revision REV (``git archive``) on the
same file, in a subprocess: the code before the head, quoted as the "before" numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from mnist_edge import accounting, ledger, ledger_store
from perf_common import RESULTS, cpu_class, load, machine, median

ROUND = dict(model_id="bench", data_fingerprint="f", max_grad_norm=1.0, sample_rate=0.064, steps=15,
             delta=1e-5, budget=None)
BASELINE = """
import json, shutil, sys, time
from pathlib import Path
from mnist_edge import ledger
source, work, repeats = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
times = {"read": [], "charge": []}
for i in range(repeats):
    ledger._rdp.cache_clear()
    start = time.perf_counter(); ledger.read(source); times["read"].append(time.perf_counter() - start)
    copy = work / f"baseline-{i}.jsonl"
    shutil.copy(source, copy)
    ledger._rdp.cache_clear()
    start = time.perf_counter()
    ledger.charge(copy, model_id="bench", data_fingerprint="f", noise_multiplier=5.0 + i, max_grad_norm=1.0,
                  sample_rate=0.064, steps=15, delta=1e-5, budget=None)
    times["charge"].append(time.perf_counter() - start)
print(json.dumps(times))
"""


def sigma(i: int) -> float:
    return 0.8 + 0.0005 * i


def build(path: Path, records: int) -> float:
    start = time.perf_counter()
    for i in range(records):
        ledger.charge(path, noise_multiplier=sigma(i), **ROUND)
    return time.perf_counter() - start


def timed(action, repeats: int, prepare=None) -> list[float]:
    times = []
    for i in range(repeats):
        argument = prepare(i) if prepare else None
        accounting._rdp.cache_clear()
        start = time.perf_counter()
        action(i, argument)
        times.append(time.perf_counter() - start)
    return times


def measure(path: Path, work: Path, repeats: int, full_repeats: int) -> dict[str, list[float]]:
    def copy(i: int, head: bool = True) -> Path:
        target = work / f"copy-{i}-{head}.jsonl"
        ledger_store.remove(target)
        shutil.copy(path, target)
        if head:
            shutil.copy(ledger_store.head_path(path), ledger_store.head_path(target))
        return target

    def charge_cached(i: int, target: Path) -> None:
        ledger.charge(target, noise_multiplier=5.0 + i, **ROUND)

    results = {
        "read, full verification": timed(lambda i, _: ledger.read(path, full=True), full_repeats),
        "read, from the checkpoint": timed(lambda i, _: ledger.read(path), repeats),
        "charge, no head": timed(lambda i, target: charge_cached(i, target), full_repeats,
                                 lambda i: copy(i, head=False)),
        "charge, round curve not cached": timed(lambda i, target: charge_cached(i, target), repeats, copy),
    }
    cached = []
    for i in range(repeats):
        target = copy(i)
        ledger.round_rdp(5.0 + i, ROUND["sample_rate"], ROUND["steps"])  # what plan_round did before the charge
        start = time.perf_counter()
        charge_cached(i, target)
        cached.append(time.perf_counter() - start)
    results["charge of a train task"] = cached
    return results


def baseline(revision: str, path: Path, work: Path, repeats: int) -> dict[str, list[float]]:
    source = work / "baseline-src"
    source.mkdir()
    archive = subprocess.run(["git", "archive", revision, "client"], capture_output=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    done = subprocess.run([sys.executable, "-c", BASELINE, str(path), str(work), str(repeats)], check=True,
                          capture_output=True, text=True, env={"PYTHONPATH": str(source / "client"),
                                                               "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=21, help="runs of each checkpoint measurement")
    parser.add_argument("--full-repeats", type=int, default=3, help="runs of each full verification")
    parser.add_argument("--baseline", metavar="REV", help="also time the ledger of this git revision")
    parser.add_argument("--out", type=Path, default=RESULTS / cpu_class() / "ledger.txt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "privacy-ledger.jsonl"
        built = build(path, args.records)
        size = path.stat().st_size
        results = measure(path, work, args.repeats, args.full_repeats)
        if args.baseline:
            before = baseline(args.baseline, path, work, args.full_repeats)
            results[f"before ({args.baseline}) read"] = before["read"]
            results[f"before ({args.baseline}) charge"] = before["charge"]
    lines = [machine(), f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {load()} at the end",
             f"ledger of {args.records} records ({size:,} bytes), each round its own sigma; built in {built:.1f} s",
             f"{'measurement':<40} {'median ms':>10} {'runs':>5}"]
    for name, times in results.items():
        lines.append(f"{name:<40} {median(times) * 1e3:>10.1f} {len(times):>5}")
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()

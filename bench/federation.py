"""Benchmark (not a test): how fast does FedAvg learn under IID and non-IID data?

5 clients on the offline 5k MNIST subset (800 train / 200 test images each), partitioned IID and
Dirichlet(alpha=0.3), 1 local epoch per round. Reports the rounds to 95 % and to 97 % global test
accuracy and the accuracy after 10 and 20 rounds; writes ``bench/results/federation[-TAG].json``
and ``.txt`` plus each run's ``history.csv``. Run from the repository root::

    .venv/bin/python bench/federation.py [--rounds 20] [--batch-size 64] [--learning-rate 1.0]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
from pathlib import Path

from mnist_edge.prepare import prepare
from mnist_edge.simulate import simulate

RESULTS = Path(__file__).resolve().parent / "results"
SETUPS = {"iid": {"partition": "iid"}, "dirichlet-0.3": {"partition": "dirichlet", "alpha": 0.3}}
TARGETS = (0.95, 0.97)


def run(setup: str, args: argparse.Namespace, work: Path) -> None:
    """Prepare and simulate one setup; its history lands in ``results/history-SETUP[TAG].csv``."""
    data_dir = work / setup / "clients"
    prepare("mnist5k", args.clients, data_dir, seed=args.seed, **SETUPS[setup])
    simulate(data_dir, args.rounds, work / setup / "run", epochs=args.epochs, batch_size=args.batch_size,
             learning_rate=args.learning_rate, seed=args.seed, progress=False)
    shutil.copyfile(work / setup / "run" / "history.csv", RESULTS / f"history-{setup}{args.tag}.csv")


def summarize(setup: str, history_csv: Path) -> dict:
    """The benchmark's numbers from one run's history (so setups can run as separate processes)."""
    with open(history_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    accuracy = [float(r["test_accuracy"]) for r in rows]
    reached = {f"rounds_to_{round(100 * t)}": next((i for i, a in enumerate(accuracy) if a >= t), None)
               for t in TARGETS}
    return {
        "setup": setup,
        **reached,
        "accuracy_at_10": accuracy[10] if len(accuracy) > 10 else None,
        "accuracy_at_20": accuracy[20] if len(accuracy) > 20 else None,
        "final_accuracy": accuracy[-1],
        "rounds": len(rows) - 1,
        "seconds": round(sum(float(r["seconds"]) for r in rows), 1),
    }


def table(rows: list[dict]) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    def rounds(value: int | None) -> str:
        return "not reached" if value is None else str(value)

    lines = [f"{'partition':<15} {'rounds to 95 %':>14} {'rounds to 97 %':>14} "
             f"{'acc @ 10':>9} {'acc @ 20':>9} {'seconds':>8}"]
    for r in rows:
        lines.append(f"{r['setup']:<15} {rounds(r['rounds_to_95']):>14} {rounds(r['rounds_to_97']):>14} "
                     f"{pct(r['accuracy_at_10']):>9} {pct(r['accuracy_at_20']):>9} {r['seconds']:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setups", nargs="*", choices=sorted(SETUPS), default=list(SETUPS),
                        help="setups to run (none: only summarize the histories already in bench/results)")
    parser.add_argument("--tag", default="", help="suffix for the result files, e.g. --tag=-batch16")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mnist-edge-bench-"))
    try:
        for setup in args.setups:
            run(setup, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [summarize(s, RESULTS / f"history-{s}{args.tag}.csv") for s in SETUPS
            if (RESULTS / f"history-{s}{args.tag}.csv").exists()]
    config = {k: v for k, v in vars(args).items() if k not in ("setups", "tag")}
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in config.items())
    command = f"python bench/federation.py {options}"
    command += f" --tag={args.tag}" if args.tag else ""
    (RESULTS / f"federation{args.tag}.json").write_text(
        json.dumps({"command": command, "config": config, "results": rows}, indent=2))
    (RESULTS / f"federation{args.tag}.txt").write_text(f"$ {command}\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()

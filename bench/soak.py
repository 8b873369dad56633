"""Soak: one real ``scaleout client start`` process through many rounds; does its memory settle?

One node (the compute package as ``scaleout package create`` ships it, 1,000 train and 1,000
test images from the bundled 5k subset) against the loopback test combiner of ``tests/``. Each
round: train on the previous round's model (1 epoch, batch 32), validate it, and every tenth
round an inference task. The client's RSS (``VmRSS`` of its process) is read after every round;
the report gives it per round and its growth from round ``--settle`` to the last (target < 5 %).

    .venv/bin/python bench/soak.py [--rounds 50 --settle 5] [--out bench/results/soak.txt]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

import numpy as np  # noqa: E402

from combiner import INFER, TRAIN, VALIDATE, TestCombiner  # noqa: E402
from e2e_helpers import EdgeNode, Fleet, package_tarball, prepare_shards, unpack  # noqa: E402
from mnist_edge import data, model  # noqa: E402
from perf_common import Report, machine  # noqa: E402

TASK_TIMEOUT = 300


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def one_node(root: Path) -> EdgeNode:
    tarball = package_tarball(root / "dist")
    (data_dir,) = prepare_shards(root / "data", 1, 0.8)  # 1,000 train, 4,000 test
    test = data.read_shard(data_dir / "test" / "shard-000.csv")
    shutil.rmtree(data_dir / "test")
    shutil.rmtree(data_dir / "predict")
    data.write_shard(data_dir / "test" / "shard-000.csv", test.images[:1000], test.labels[:1000], test.image_ids[:1000])
    data.write_shard(data_dir / "predict" / "shard-000.csv", test.images[1000:2000], test.labels[1000:2000])
    workdir = root / "node-0"
    unpack(tarball, workdir)
    return EdgeNode("client-0", workdir, data_dir)


def task(combiner: TestCombiner, node: EdgeNode, kind: str, model_id: str, payload: dict, round_id: str):
    (done,) = combiner.wait_for_tasks([combiner.submit_task(node.name, kind, model_id, payload, round_id=round_id)],
                                      TASK_TIMEOUT)
    if done.status != "COMPLETED":
        raise SystemExit(f"{kind} in {round_id} ended {done.status}: {done.response}\n{node.log_tail()}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--settle", type=int, default=5, help="growth is measured from this round (default 5)")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    report = Report()
    report(machine())
    with tempfile.TemporaryDirectory() as tmp:
        node = one_node(Path(tmp))
        fleet = Fleet(TestCombiner(), [node])
        try:
            fleet.start(polling_interval=1)
            model_id = fleet.combiner.put_model(model.get_parameters(model.new_model(0)))
            fleet.wait_ready(300)
            report(f"one client, {args.rounds} rounds (train 1,000 images 1 epoch batch 32 + validate; "
                   "inference every 10th round)")
            report(f"{'round':>5} {'RSS MB':>8} {'seconds':>8}")
            history = []
            for number in range(1, args.rounds + 1):
                start = time.perf_counter()
                before = len(fleet.combiner.uploads)
                settings = {"epochs": 1, "batch_size": 32, "seed": number}
                task(fleet.combiner, node, TRAIN, model_id, {"client_settings": settings}, f"r{number}")
                model_id = fleet.combiner.uploads[before]
                task(fleet.combiner, node, VALIDATE, model_id, {}, f"r{number}")
                if number % 10 == 0:
                    task(fleet.combiner, node, INFER, model_id, {"parameters": {}}, f"r{number}")
                history.append(rss_mb(node.process.pid))
                report(f"{number:>5} {history[-1]:>8.1f} {time.perf_counter() - start:>8.1f}")
        finally:
            fleet.kill()
    settled = history[args.settle - 1]
    growth = 100 * (history[-1] - settled) / settled
    peak = 100 * (max(history[args.settle - 1 :]) - settled) / settled
    rounds = np.arange(args.settle, args.rounds + 1)
    slope = float(np.polyfit(rounds, history[args.settle - 1 :], 1)[0]) if len(rounds) > 1 else 0.0
    report(f"RSS after round {args.settle}: {settled:.1f} MB; after round {args.rounds}: {history[-1]:.1f} MB; "
           f"growth {growth:+.2f} % (target < 5 %); highest {peak:+.2f} %; least-squares trend "
           f"{slope:+.3f} MB per round ({100 * slope * (len(rounds) - 1) / settled:+.2f} % over rounds "
           f"{args.settle}-{args.rounds})")
    report.save(args.out)


if __name__ == "__main__":
    main()

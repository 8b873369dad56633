"""Training throughput: the pytorch/examples loop (A) against our train callback (B), alternating.

(A) is what a user writes by following pytorch/examples ``mnist/main.py``: float32 tensors in a
``TensorDataset``, a shuffling ``DataLoader``, ``Adadelta``, batch 64 (without the example's
StepLR, so both run the same algorithm). (B) is the edge train callback exactly as a round runs
it: ``EdgeClient`` -> ``EdgeTasks.train`` with an abort check every batch and metrics logged
through a runtime that discards them; B's time is the whole callback (parameter decode, cached
data, training, update serialization), A's only its loop.

A and B alternate (A B A B ...) on the same images with the same thread count, each in its own
worker process started once: process-wide state stays each contender's own, as when a user runs
them (B's training tunes glibc's allocator for its process, see ``training.keep_freed_memory``;
a user's loop does not get that), while alternation still shares out the machine's noise. Each
worker warms up (oneDNN builds its kernels on first use) before the pairs. Pair ``k`` uses
seed ``k`` for both: the same initial weights, the same shuffles (the DataLoader gets a generator
with that seed, as B's ``randperm`` does) and the same dropout seed, so the accuracy difference
is the precision's. Accuracy is float32 test accuracy on held-out images after the same epochs.

    .venv/bin/python bench/train_throughput.py [--train 4000 --test 1000 --epochs 2 --reps 5 --threads N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from mnist_edge import data, edge, model, runtime, training
from perf_common import Report, images, machine, median


class Clock:
    """Wall and CPU seconds of one run. CPU time (all threads) shrugs off other processes' load."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return self


class DiscardRuntime(runtime.LocalRuntime):
    """The in-process runtime, minus the metric log: B pays for the calls, not for storage."""

    def send_metric(self, metrics: dict, model_id: str, step: int, round_id: str, session_id: str) -> bool:
        return True


def reference_run(x: np.ndarray, y: np.ndarray, args: argparse.Namespace, seed: int) -> tuple[Clock, model.Net]:
    """(A): the pytorch/examples loop; returns (time in the loop, trained net)."""
    net = model.new_model(seed)
    inputs = torch.from_numpy(x).float().div(255).sub(training.MNIST_MEAN).div(training.MNIST_STD).unsqueeze(1)
    loader = DataLoader(TensorDataset(inputs, torch.from_numpy(y)), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adadelta(net.parameters(), lr=args.learning_rate)
    torch.manual_seed(seed)
    clock = Clock()
    net.train()
    for _epoch in range(args.epochs):
        for batch, target in loader:
            optimizer.zero_grad()
            loss = F.nll_loss(net(batch), target)
            loss.backward()
            optimizer.step()
    return clock.stop(), net


def callback_run(client, args: argparse.Namespace, seed: int) -> tuple[Clock, model.Net]:
    """(B): one train callback from the seed model; returns (time in the callback, trained net)."""
    incoming = edge.to_scaleout_model(model.get_parameters(model.new_model(seed)))
    settings = {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                "optimizer": "adadelta", "seed": seed, "precision": args.precision}
    clock = Clock()
    updated, _metadata = runtime.run_task(client, "train", incoming, settings)
    clock.stop()
    net = model.Net()
    model.set_parameters(net, edge.params_from(updated))
    return clock, net


_worker: dict = {}


def _start_worker(contender: str, args: argparse.Namespace, node: Path, warm_node: Path) -> None:
    """Worker initializer: the images, the contender's client, one warm-up run."""
    torch.set_num_threads(args.threads)
    pixels, labels = images(args.train + args.test)
    x, y = pixels[: args.train], labels[: args.train]
    _worker.update(args=args, x=x, y=y, x_test=pixels[args.train :], y_test=labels[args.train :])
    if contender == "A":
        reference_run(x[:640], y[:640], args, 0)
        _worker["run"] = lambda seed: reference_run(x, y, args, seed)
    else:
        data.load_split(node, "train")  # a node's shard cache is warm after its first round
        client, warm_client = (runtime.local_client(d, runtime=DiscardRuntime()) for d in (node, warm_node))
        callback_run(warm_client, args, 0)
        _worker["run"] = lambda seed: callback_run(client, args, seed)


def _pair_run(seed: int) -> tuple[float, float, float]:
    """One run in a worker: (wall seconds, CPU seconds of the worker, held-out test accuracy)."""
    clock, net = _worker["run"](seed)
    accuracy = training.evaluate(net, _worker["x_test"], _worker["y_test"], torch.device("cpu"))[1]
    return clock.wall, clock.cpu, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=4000, help="training images (default 4000)")
    parser.add_argument("--test", type=int, default=1000, help="held-out test images (default 1000)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="A/B pairs (default 5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1.0)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="B's setting")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, A and B")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = Report()
    report(machine())
    cpu = torch.device("cpu")
    report(f"threads {args.threads}; B precision {args.precision} -> "
           f"{'bf16' if training.use_bf16(args.precision, cpu) else 'fp32'}; "
           f"{args.train} train / {args.test} test images; {args.epochs} epoch(s); batch {args.batch_size}")
    pixels, labels = images(args.train + args.test)
    x, y = pixels[: args.train], labels[: args.train]
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        node, warm_node = Path(tmp) / "node", Path(tmp) / "warm"
        data.write_shard(node / "train" / "shard-000.csv", x, y)
        data.write_shard(warm_node / "train" / "shard-000.csv", x[:640], y[:640])
        workers = {name: spawn.Pool(1, _start_worker, (name, args, node, warm_node)) for name in ("A", "B")}
        rates: dict[str, list[float]] = {"A": [], "B": []}
        cpu_rates: dict[str, list[float]] = {"A": [], "B": []}
        accuracy: dict[str, list[float]] = {"A": [], "B": []}
        count = args.train * args.epochs
        try:
            for seed in range(args.reps):
                for name in ("A", "B"):
                    wall, cpu_seconds, test_accuracy = workers[name].apply(_pair_run, (seed,))
                    rates[name].append(count / wall)
                    cpu_rates[name].append(count / cpu_seconds)
                    accuracy[name].append(test_accuracy)
                    report(f"pair {seed} {name}: {rates[name][-1]:7.0f} images/s wall {cpu_rates[name][-1]:7.0f} per CPU-s"
                           f"  test accuracy {accuracy[name][-1]:.4f}")
        finally:
            for pool in workers.values():
                pool.terminate()
    ratios = [b / a for a, b in zip(rates["A"], rates["B"])]
    cpu_ratios = [b / a for a, b in zip(cpu_rates["A"], cpu_rates["B"])]
    for name, label in (("A", "A reference loop"), ("B", "B train callback")):
        report(f"{label}  median {median(rates[name]):7.0f} images/s wall {median(cpu_rates[name]):7.0f} per CPU-s"
               f"  mean test accuracy {np.mean(accuracy[name]):.4f} ({', '.join(f'{a:.3f}' for a in accuracy[name])})")
    report(f"median ratio B/A {median(ratios):.2f} wall (pairs: {', '.join(f'{r:.2f}' for r in ratios)}), "
           f"{median(cpu_ratios):.2f} CPU time (pairs: {', '.join(f'{r:.2f}' for r in cpu_ratios)}); "
           f"accuracy B-A {100 * (np.mean(accuracy['B']) - np.mean(accuracy['A'])):+.2f} points "
           f"(target: ratio >= 2.0, within 0.5 points)")
    report.save(args.out)


if __name__ == "__main__":
    main()

"""Training throughput: the pytorch/examples loop (A) against our train callback (B), alternating.

(A) is what a user writes by following pytorch/examples ``mnist/main.py``: its ``Net`` verbatim
(:class:`ExampleNet`), float32 tensors in a ``TensorDataset``, a shuffling ``DataLoader``,
``Adadelta``, batch 64 (without the example's StepLR and logging, so both run the same
algorithm and A does no extra work). (B) is the edge train callback exactly as a round runs it:
``EdgeClient`` -> ``EdgeTasks.train`` with an abort check every batch and metrics logged
through a runtime that discards them; B's time is the whole callback (parameter decode, cached
data, training, update serialization), A's only its loop. B runs with ``precision`` forced to
fp32 ("B fp32", the same arithmetic as A) and, where this CPU computes bf16 natively, also with
bf16 ("B bf16", what ``auto`` picks there).

All contenders alternate (A, B fp32, B bf16, then the other way round) in this one process, on the same images,
with the same torch thread count; each runs once short first (oneDNN builds its kernels on first
use). The glibc allocator setting that B's training makes (``hardware.keep_freed_memory``) is
process-wide, so it is made before the first run and A has it too. Pair ``k`` uses seed ``k``
for every contender: the same initial weights and the same shuffles (the DataLoader gets a
generator with that seed, as B's ``randperm`` does); dropout masks differ (B draws its own), so
accuracies differ by chance. Accuracy is float32 test accuracy on held-out images after the
same epochs. Every result line names the CPU, its deciding flags and the load average.

    .venv/bin/python bench/train_throughput.py [--train 4000 --test 1000 --epochs 2 --reps 7 --threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mnist_edge import container, data, hardware, model, runtime, training
from perf_common import Report, cpu_tag, images, load, machine, median

TARGET = "ratio >= 1.3 in fp32, bf16 where native; accuracy within 0.5 points"


class ExampleNet(nn.Module):
    """pytorch/examples mnist/main.py ``Net``, as the example writes it (ReLU before the pool)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


class Clock:
    """Wall and CPU seconds of one run. CPU time (all threads) shrugs off other processes' load."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> Clock:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return self


class DiscardRuntime(runtime.LocalRuntime):
    """The in-process runtime, minus the metric log: B pays for the calls, not for storage."""

    def send_metric(self, metrics: dict, model_id: str, step: int, round_id: str, session_id: str) -> bool:
        return True


def reference_run(x: np.ndarray, y: np.ndarray, args: argparse.Namespace, seed: int) -> tuple[Clock, nn.Module]:
    """(A): the pytorch/examples loop from the seed-``seed`` weights; returns (time in the loop, trained net)."""
    net = ExampleNet()
    net.load_state_dict(model.new_model(seed).state_dict())
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


def callback_run(client, args: argparse.Namespace, seed: int, precision: str) -> tuple[Clock, nn.Module]:
    """(B): one train callback from the seed-``seed`` model; returns (time in the callback, trained net)."""
    incoming = container.to_scaleout_model(model.get_parameters(model.new_model(seed)))
    settings = {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                "optimizer": "adadelta", "seed": seed, "precision": precision}
    clock = Clock()
    updated, _metadata = runtime.run_task(client, "train", incoming, settings)
    clock.stop()
    net = model.Net()
    model.set_parameters(net, container.params_from(updated))
    return clock, net


def contenders(x: np.ndarray, y: np.ndarray, args: argparse.Namespace, node: Path,
               warm_node: Path) -> dict[str, Callable[[int], tuple]]:
    """Name -> run(seed) on the training images (``node`` holds them as a shard), each warmed up once."""
    runs: dict[str, Callable[[int], tuple]] = {"A": lambda seed: reference_run(x, y, args, seed)}
    reference_run(x[:640], y[:640], args, 0)
    data.load_split(node, "train")  # a node's shard cache is warm after its first round
    client, warm_client = (runtime.local_client(d, runtime=DiscardRuntime()) for d in (node, warm_node))
    precisions = ["fp32"] + (["bf16"] if hardware.bf16_supported(torch.device("cpu")) else [])
    for precision in precisions:
        callback_run(warm_client, args, 0, precision)
        runs[f"B {precision}"] = lambda seed, p=precision: callback_run(client, args, seed, p)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=4000, help="training images (default 4000)")
    parser.add_argument("--test", type=int, default=1000, help="held-out test images (default 1000)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7, help="rounds of alternation (default 7)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, A and B")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hardware.keep_freed_memory()  # process-wide: A gets B's allocator setting too
    report = Report()
    report(machine())
    report(f"threads {args.threads}; "
           f"{args.train} train / {args.test} test images; {args.epochs} epoch(s); batch {args.batch_size}")
    pixels, labels = images(args.train + args.test)
    x, y, x_test, y_test = pixels[: args.train], labels[: args.train], pixels[args.train :], labels[args.train :]
    rates: dict[str, list[float]] = {}
    cpu_rates: dict[str, list[float]] = {}
    accuracy: dict[str, list[float]] = {}
    count = args.train * args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        node, warm_node = Path(tmp) / "node", Path(tmp) / "warm"
        data.write_shard(node / "train" / "shard-000.csv", x, y)
        data.write_shard(warm_node / "train" / "shard-000.csv", x[:640], y[:640])
        runs = contenders(x, y, args, node, warm_node)
        for seed in range(args.reps):
            for name, run in list(runs.items())[:: 1 if seed % 2 == 0 else -1]:
                clock, net = run(seed)
                rates.setdefault(name, []).append(count / clock.wall)
                cpu_rates.setdefault(name, []).append(count / clock.cpu)
                accuracy.setdefault(name, []).append(training.evaluate(net, x_test, y_test, torch.device("cpu"))[1])
                report(f"pair {seed} {name:6}: {rates[name][-1]:7.0f} images/s wall {cpu_rates[name][-1]:7.0f} "
                       f"per CPU-s  test accuracy {accuracy[name][-1]:.4f}  ({load()})")
    for name in runs:
        report(f"{name:6} median {median(rates[name]):7.0f} images/s wall {median(cpu_rates[name]):7.0f} per CPU-s"
               f"  mean test accuracy {np.mean(accuracy[name]):.4f} ({', '.join(f'{a:.3f}' for a in accuracy[name])})")
    for name in (n for n in runs if n != "A"):
        ratios = [b / a for a, b in zip(rates["A"], rates[name])]
        cpu_ratios = [b / a for a, b in zip(cpu_rates["A"], cpu_rates[name])]
        report(f"{name} / A: median ratio {median(ratios):.2f} wall (pairs: {', '.join(f'{r:.2f}' for r in ratios)}), "
               f"{median(cpu_ratios):.2f} CPU time (pairs: {', '.join(f'{r:.2f}' for r in cpu_ratios)}); "
               f"accuracy B-A {100 * (np.mean(accuracy[name]) - np.mean(accuracy['A'])):+.2f} points; "
               f"threads {args.threads}; {cpu_tag()}; {load()}")
    report(f"(target: {TARGET})")
    report.save(args.out)


if __name__ == "__main__":
    main()

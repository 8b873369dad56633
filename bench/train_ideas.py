"""Which training ideas pay: our loop with one idea taken out (or added), against the reference.

Every variant runs ``training.train`` (seed per round) on the same images, in fp32 and, where
this CPU computes bf16 natively, in bf16, all alternating in this one process with the
pytorch/examples loop (A, from ``train_throughput``, always fp32); the report gives each
variant's median images/s and its median ratio to A over the rounds. The ideas that are on by
default are taken out one at a time ("without ..."), so each line shows what that idea is worth
on top of the others; ideas that were measured and left out are put in ("with ...").

    .venv/bin/python bench/train_ideas.py [--train 2000 --reps 5 --threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Callable, ContextManager
from unittest import mock

import torch
import torch.nn.functional as F

from mnist_edge import model, parallel, training
from mnist_edge.settings import parse_settings
from perf_common import Report, cpu_tag, images, load, machine, median
from train_throughput import ExampleNet, reference_run


def example_order(net: model.Net, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return ExampleNet.forward(net, x)  # ReLU before the pool, nn.Dropout's bernoulli masks


def torch_dropout(self: model.Dropout, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return F.dropout(x, self.p, self.training)


def foreach_optimizer(name: str, params, learning_rate: float) -> torch.optim.Optimizer:
    return torch.optim.Adadelta(params, lr=learning_rate, foreach=True)


VARIANTS: dict[str, Callable[[], ContextManager]] = {
    "ours (all on)": contextlib.nullcontext,
    "without batch parts (intra-op threads)": lambda: mock.patch.object(training, "batch_parts", lambda *a: 1),
    "without channels_last": lambda: mock.patch.object(training, "memory_format_for",
                                                       lambda device: torch.contiguous_format),
    "without pool-before-ReLU": lambda: mock.patch.object(model.Net, "forward", example_order),
    "without byte-mask dropout": lambda: mock.patch.object(model.Dropout, "forward", torch_dropout),
    "with foreach Adadelta": lambda: mock.patch.object(training, "make_optimizer", foreach_optimizer),
}


def ours_run(x, y, seed: int, precision: str, variant: Callable[[], ContextManager]) -> float:
    """Seconds for one ``training.train`` call under ``variant``."""
    net = model.new_model(seed)
    settings = parse_settings({"epochs": 1, "seed": seed, "precision": precision})
    with variant():
        start = time.perf_counter()
        training.train(net, x, y, settings, device=torch.device("cpu"))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=2000, help="training images per run (default 2000)")
    parser.add_argument("--reps", type=int, default=5, help="rounds of alternation (default 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    args.epochs, args.batch_size, args.learning_rate = 1, 64, 1.0
    torch.set_num_threads(args.threads)
    training.keep_freed_memory()  # process-wide, as in train_throughput
    report = Report()
    report(machine())
    report(f"threads {args.threads}; batch parts by default {parallel.batch_parts(torch.device('cpu'))}; "
           f"{args.train} images, 1 epoch, batch 64")
    x, y = images(args.train)
    runs: dict[str, Callable[[int], float]] = {"A reference loop": lambda seed: reference_run(x, y, args, seed)[0].wall}
    precisions = ["fp32"] + (["bf16"] if training.bf16_supported(torch.device("cpu")) else [])
    for precision in precisions:
        runs.update({f"{precision} {name}": (lambda seed, p=precision, v=variant: ours_run(x, y, seed, p, v))
                     for name, variant in VARIANTS.items() if precision == "fp32" or "foreach" not in name})
    for run in runs.values():  # warm-up: oneDNN builds its kernels on first use
        run(0)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for seed in range(args.reps):
        for name, run in (runs.items() if seed % 2 == 0 else reversed(runs.items())):
            seconds[name].append(run(seed))
        report(f"round {seed}: " + ", ".join(f"{args.train / s[-1]:.0f}" for s in seconds.values())
               + f" images/s ({load()})")
    for name, times in seconds.items():
        ratios = [a / t for a, t in zip(seconds["A reference loop"], times)]
        report(f"{name:45} median {args.train / median(times):6.0f} images/s  ratio to A {median(ratios):.2f} "
               f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    report(f"(threads {args.threads}; {cpu_tag()}; {load()})")
    report.save(args.out)


if __name__ == "__main__":
    main()

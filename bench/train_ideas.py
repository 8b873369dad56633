"""Which training ideas pay: our training step with one idea taken out (or added), against the reference.

Each variant is a training step on a batch of 64 real images: the pytorch/examples step (A:
:class:`train_throughput.ExampleNet` on float32 inputs converted once, ``Adadelta``, fp32) and
ours (``training.to_input`` + ``training.train_step``: the step ``training.train`` runs), in
fp32 and, where this CPU computes bf16 natively, in bf16. The ideas that are on by default are
taken out one at a time ("without ..."), so each line shows what that idea is worth on top of
the others; ideas that were measured and left out are put in ("with ..."). Every round runs
``--steps`` steps of each variant, all variants one after the other (in reverse order every
other round), so a shared machine's load swings reach every variant alike; a variant's ratio is
the median over the rounds of (A's time / its time) in the same round.

    .venv/bin/python bench/train_ideas.py [--rounds 60 --steps 2 --threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mnist_edge import hardware, model, training
from perf_common import Report, cpu_tag, images, load, machine, median
from train_throughput import ExampleNet

CPU = torch.device("cpu")


class Reference:
    """A: the pytorch/examples step on float32 inputs normalised once up front."""

    def __init__(self, pixels: np.ndarray, labels: torch.Tensor) -> None:
        self.net = ExampleNet()
        self.net.load_state_dict(model.new_model(0).state_dict())
        self.net.train()
        self.optimizer = torch.optim.Adadelta(self.net.parameters(), lr=1.0)
        self.inputs = torch.from_numpy(pixels).float().div(255).sub(training.MNIST_MEAN).div(training.MNIST_STD)
        self.inputs, self.labels = self.inputs.unsqueeze(1), labels

    def step(self, index: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        F.nll_loss(self.net(self.inputs[index]), self.labels[index]).backward()
        self.optimizer.step()


class Ours:
    """Our step, as ``training.train`` runs it, with one idea changed by the keyword arguments."""

    def __init__(
        self,
        pixels: np.ndarray,
        labels: torch.Tensor,
        bf16: bool,
        channels_last: bool = True,
        pool_first: bool = True,
        byte_dropout: bool = True,
        foreach: bool = False,
    ) -> None:
        self.net = model.new_model(0)
        if not pool_first:  # the example's order; its dropout is still ours unless taken out below
            self.net.forward = lambda x, generator=None: ExampleNet.forward(self.net, x)
        if not byte_dropout:
            for layer in (self.net.dropout1, self.net.dropout2):
                layer.forward = lambda x, generator=None, p=layer.p: F.dropout(x, p, True)
        self.memory_format = hardware.memory_format_for(CPU) if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format).train()
        self.optimizer = (
            torch.optim.Adadelta(self.net.parameters(), lr=1.0, foreach=True)
            if foreach
            else training.make_optimizer("adadelta", self.net.parameters(), 1.0)
        )
        self.bf16, self.generator = bf16, training.dropout_generator(0, CPU)
        self.pixels, self.labels = torch.from_numpy(pixels), labels

    def step(self, index: torch.Tensor) -> None:
        x = training.to_input(self.pixels[index], CPU, self.memory_format)
        training.train_step(self.net, self.optimizer, x, self.labels[index], self.bf16, self.generator)


IDEAS: dict[str, dict] = {
    "ours (all on)": {},
    "without channels_last": {"channels_last": False},
    "without pool-before-ReLU": {"pool_first": False},
    "without byte-mask dropout": {"byte_dropout": False},
    "with foreach Adadelta": {"foreach": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="rounds of alternation (default 60)")
    parser.add_argument("--steps", type=int, default=2, help="steps of each variant per round (default 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hardware.keep_freed_memory()  # process-wide, as in train_throughput
    report = Report()
    report(machine())
    report(f"threads {args.threads}; batch 64; {args.rounds} rounds of {args.steps} steps per variant")
    pixels, labels = images(64 * 60)
    labels = torch.from_numpy(labels.astype(np.int64))
    variants: dict[str, Callable[[torch.Tensor], None]] = {"A reference step (fp32)": Reference(pixels, labels).step}
    for precision in ["fp32"] + (["bf16"] if hardware.bf16_supported(CPU) else []):
        for name, idea in IDEAS.items():
            if precision == "fp32" or "foreach" not in name:
                variants[f"{precision} {name}"] = Ours(pixels, labels, precision == "bf16", **idea).step
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).view(-1, 64)
    for step in variants.values():  # warm-up: oneDNN builds its kernels on first use
        for batch in order[:3]:
            step(batch)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        items = list(variants.items())
        for name, step in items if round_index % 2 == 0 else reversed(items):
            start = time.perf_counter()
            for k in range(args.steps):
                step(order[(round_index * args.steps + k) % len(order)])
            seconds[name].append((time.perf_counter() - start) / args.steps)
    reference = seconds["A reference step (fp32)"]
    for name, times in seconds.items():
        ratios = [a / t for a, t in zip(reference, times)]
        report(
            f"{name:45} median {1e3 * median(times):6.1f} ms/step, fastest {1e3 * min(times):6.1f}; "
            f"ratio to A {median(ratios):.2f} (quartiles {np.percentile(ratios, 25):.2f}-"
            f"{np.percentile(ratios, 75):.2f})"
        )
    report(f"(threads {args.threads}; {cpu_tag()}; {load()})")
    report.save(args.out)


if __name__ == "__main__":
    main()

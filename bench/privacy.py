"""Benchmark: what DP-SGD (Opacus) costs per training step and in accuracy.

Step time: one batch of real MNIST images, the same images and batch every step. In one process,
alternating, the plain step as ``training.train`` runs it (``auto`` precision, and fp32) and the
DP-SGD step of ``dpsgd.make_private`` in each of Opacus's per-sample gradient modes: ``hooks``,
``functorch``, ``ew`` (expanded weights) and ``ghost`` (ghost clipping, what DP rounds use). Medians over ``--reps``
alternations of ``--steps`` steps each; the target is DP <= 2.0x the plain step.

Accuracy: ``--clients`` IID clients on the offline 5k subset (``prepare``), ``--rounds`` FedAvg
rounds through ``simulate`` (real ``EdgeClient`` callbacks, each client with its own ledger), for
each ε budget and without DP. For a budget, σ is what Opacus's ``get_noise_multiplier`` says makes
all the rounds fit it exactly; every client's node budget is that ε.

    .venv/bin/python bench/privacy.py [--threads 2] [--rounds 10] [--budgets 1 3 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from opacus.accountants.utils import get_noise_multiplier

from mnist_edge import data, dpsgd, hardware, model, privacy, training
from mnist_edge.node import DEFAULT_DELTA
from mnist_edge.prepare import prepare
from mnist_edge.settings import parse_settings
from mnist_edge.simulate import simulate
from perf_common import RESULTS, Report, cpu_tag, images, load, machine, median

DP_MODES = ("hooks", "functorch", "ew", "ghost")


class PlainStep:
    """The non-DP step of ``training.train`` (``training.train_step``), precision as ``precision`` says."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.bf16 = hardware.use_bf16(precision, device)
        self.memory_format = hardware.memory_format_for(device)
        self.device = device
        self.net = model.new_model(0).to(device, memory_format=self.memory_format).train()
        self.optimizer = training.make_optimizer("adadelta", self.net.parameters(), 1.0)

    def __call__(self, x_u8: torch.Tensor, y: torch.Tensor) -> None:
        x = training.to_input(x_u8, self.device, self.memory_format)
        training.train_step(self.net, self.optimizer, x, y, self.bf16)


class PrivateStep:
    """One DP-SGD step in one of Opacus's modes (σ 1.0, C 1.0, fp32, as a DP round runs it)."""

    def __init__(self, mode: str, batch: int, device: torch.device) -> None:
        self.device = device
        settings = parse_settings({"batch_size": batch, "dp_noise_multiplier": 1.0})
        plan = dpsgd.RoundPlan(1.0, 1.0, 0.01, 1, 1e-5, batch, settings)
        net = model.new_model(0).to(device).train()
        self.private = dpsgd.make_private(net, plan, device, mode)

    def __call__(self, x_u8: torch.Tensor, y: torch.Tensor) -> None:
        self.private.step(training.to_input(x_u8, self.device), y)


def step_times(args: argparse.Namespace, report: Report) -> dict[str, float]:
    """Median ms per step of each contender, alternating them ``--reps`` times."""
    device = torch.device("cpu")
    pixels, labels = images(args.batch)
    x_u8, y = torch.from_numpy(pixels), torch.from_numpy(labels.astype(np.int64))
    contenders = {"plain (auto)": PlainStep("auto", device), "plain (fp32)": PlainStep("fp32", device)}
    contenders.update({f"dp {name}": PrivateStep(name, args.batch, device) for name in args.modes})
    for step in contenders.values():  # warm-up: oneDNN builds its kernels on the first steps
        step(x_u8, y)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(args.reps):
        items = list(contenders.items())
        for name, step in items if rep % 2 == 0 else reversed(items):  # drift reaches every contender alike
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x_u8, y)
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    medians = {name: median(values) for name, values in times.items()}
    auto = medians["plain (auto)"]
    report(f"batch {args.batch}, {args.steps} steps x {args.reps} alternations, threads {args.threads}; "
           f"plain (auto) computes in {'bf16' if contenders['plain (auto)'].bf16 else 'fp32'}")
    report(f"{'step':<16} {'median ms':>10} {'x plain (auto)':>15} {'x plain (fp32)':>15}")
    for name, value in medians.items():
        report(f"{name:<16} {value:>10.1f} {value / auto:>15.2f} {value / medians['plain (fp32)']:>15.2f}")
    if "dp ghost" in times:  # the mode DP rounds use: median of the ratios within each alternation
        for plain in ("plain (auto)", "plain (fp32)"):
            ratios = [d / p for d, p in zip(times["dp ghost"], times[plain])]
            report(f"DP step (ghost) / {plain} step: median ratio {median(ratios):.2f}x "
                   f"(alternations: {', '.join(f'{r:.2f}' for r in ratios)}; target <= 2.0x: "
                   f"{'met' if median(ratios) <= 2.0 else 'not met'}); {cpu_tag()}; {load()}")
    return medians


def accuracy_runs(args: argparse.Namespace, report: Report, work: Path) -> list[dict]:
    """One federation per budget (and one without DP); the final global test accuracy of each."""
    data_dir = work / "clients"
    prepare("mnist5k", args.clients, data_dir, seed=0, partition="iid")
    if args.train_images:  # smoke runs: a few images per client keep the DP rounds short
        for client in sorted(data_dir.glob("client-*")):
            split = data.load_split(client, "train")
            shutil.rmtree(client / "train")
            keep = slice(0, args.train_images)
            data.write_shard(client / "train" / "shard-000.csv", split.images[keep], split.labels[keep],
                             split.image_ids[keep])
    n = len(data.load_split(data_dir / "client-0", "train"))  # IID: every client holds the same count
    q = min(1.0, args.fed_batch_size / n)
    steps = args.rounds * privacy.steps_per_epoch(n, q)
    rows = []
    for budget in [*args.budgets, None]:
        sigma = None if budget is None else get_noise_multiplier(
            target_epsilon=budget, target_delta=DEFAULT_DELTA, sample_rate=q, steps=steps, accountant="rdp")
        start = time.perf_counter()
        history = simulate(data_dir, args.rounds, work / f"run-{budget}", batch_size=args.fed_batch_size,
                           seed=0, progress=False, echo=lambda _line: None,
                           dp_settings=None if sigma is None else {"dp_noise_multiplier": sigma},
                           dp_budget=budget, dp_delta=None)
        rows.append({"budget": budget, "noise_multiplier": sigma, "rounds_trained": history[-1].round,
                     "epsilon_spent": history[-1].dp_epsilon_spent, "test_accuracy": history[-1].test_accuracy,
                     "accuracy_by_round": [h.test_accuracy for h in history],
                     "seconds": round(time.perf_counter() - start, 1)})
        r = rows[-1]
        sigma_text = "-" if sigma is None else f"{sigma:.3f}"
        spent_text = "-" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3f}"
        report(f"{'none' if budget is None else f'{budget:g}':>8}  {sigma_text:>7}  {r['rounds_trained']:>6}  "
               f"{spent_text:>9}  {100 * r['test_accuracy']:>8.1f} %  {r['seconds']:>7.0f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="images per step in the step-time part")
    parser.add_argument("--steps", type=int, default=10, help="steps per contender per alternation")
    parser.add_argument("--reps", type=int, default=5, help="alternations")
    parser.add_argument("--modes", nargs="*", choices=sorted(DP_MODES), default=list(DP_MODES))
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fed-batch-size", type=int, default=64, help="batch_size of the federation's rounds")
    parser.add_argument("--train-images", type=int, default=None, help="keep only this many train images "
                        "per client (smoke runs; default: all)")
    parser.add_argument("--budgets", type=float, nargs="*", default=[1.0, 3.0, 8.0], help="node epsilon budgets")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="also write the report here (and .json beside it)")
    parser.add_argument("--steps-only", action="store_true", help="the step times alone, no accuracy table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = Report()
    report(machine())
    medians = step_times(args, report)
    rows: list[dict] = []
    if not args.steps_only:
        report("")
        rows = accuracy_table(args, report)
    report.save(args.out)
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps({"step_ms": medians, "accuracy": rows}, indent=2))


def accuracy_table(args: argparse.Namespace, report: Report) -> list[dict]:
    """The accuracy part: its header lines, then one federation per budget (``accuracy_runs``)."""
    report(f"{args.clients} IID clients of the 5k subset, {args.rounds} rounds, batch {args.fed_batch_size}, "
           f"Adadelta 1.0, delta {DEFAULT_DELTA:g}, C {privacy.DEFAULT_MAX_GRAD_NORM}")
    report(f"{'budget':>8}  {'sigma':>7}  {'rounds':>6}  {'eps spent':>9}  {'accuracy':>10}  {'seconds':>7}")
    work = Path(tempfile.mkdtemp(prefix="mnist-edge-privacy-"))
    try:
        rows = accuracy_runs(args, report, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    main()

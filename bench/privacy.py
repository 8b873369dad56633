"""Benchmark: what DP-SGD (Opacus) costs per training step, and the accuracy a privacy budget leaves.

Step time: one batch of real MNIST images, the same images and batch every step. In one process,
alternating, the plain step as ``training.train`` runs it (``auto`` precision, and fp32) and the
DP-SGD step of ``dpsgd.make_private`` as a DP round runs it (the node's DP defaults, ``dpsgd.FROZEN``
layers kept) in each of Opacus's per-sample gradient modes: ``hooks``, ``functorch``, ``ew``
(expanded weights) and ``ghost`` (ghost clipping, what DP rounds use). Medians over ``--reps``
alternations of ``--steps`` steps each; the target is DP <= 2.0x the plain step of the same precision.

Accuracy: for each layout in ``--layouts`` (N IID clients sharing the offline 5k subset through
``prepare``: 5 clients of ~1,000 images, 2 of ~2,000, 1 central node on the pooled images),
``--rounds`` FedAvg rounds through ``simulate`` (real ``EdgeClient`` callbacks, each node with its
own ledger) where every node has only a budget (``--dp-budget``): σ planned by the node, every DP
setting the node's default. ``--runs`` runs a budget (the noise is secret: runs differ), the median
reported; and one run without DP (the round settings' defaults). ``--ideas``: one federation at ε 3
for each step from the old DP round (Adadelta 1.0, batch 64, C 1.0, every layer) to the node's
defaults, and the alternatives to keeping ``fc2``.

    .venv/bin/python bench/privacy.py [--threads 2] [--steps-only | --accuracy-only] [--runs 3] [--ideas]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist_edge import data, dpsgd, hardware, model, privacy, training
from mnist_edge.node import DEFAULT_DELTA
from mnist_edge.prepare import prepare
from mnist_edge.settings import DP_ROUND_DEFAULTS, parse_settings
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
    """One DP-SGD step in one of Opacus's modes as a DP round runs it: σ 1.0, the node's C and
    optimizer, ``dpsgd.FROZEN`` layers kept, fp32."""

    def __init__(self, mode: str, batch: int, device: torch.device) -> None:
        self.device = device
        settings = privacy.dp_round_settings(parse_settings({"batch_size": batch, "dp_noise_multiplier": 1.0}))
        plan = dpsgd.RoundPlan(1.0, privacy.DEFAULT_MAX_GRAD_NORM, 0.01, 1, 1e-5, batch, settings)
        net = model.new_model(0).to(device).train()
        self.layers = contextlib.ExitStack()
        self.layers.enter_context(dpsgd.round_layers(net))
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


@dataclass(frozen=True)
class Idea:
    """One way to train a DP round: round settings, and the layers kept (``dpsgd.FROZEN``)."""

    name: str
    settings: dict
    frozen: tuple[str, ...] = dpsgd.FROZEN


OLD = {"optimizer": "adadelta", "learning_rate": 1.0, "batch_size": 64, "dp_max_grad_norm": 1.0}
SGD16 = {"optimizer": "sgd", "learning_rate": 16.0}
IDEAS = (
    Idea("old DP round: Adadelta 1.0, batch 64, C 1.0, every layer", OLD, ()),
    Idea("+ plain SGD, lr 16", {**OLD, **SGD16}, ()),
    Idea("+ C 0.1", {**OLD, **SGD16, "dp_max_grad_norm": 0.1}, ()),
    Idea("+ batch 200 (q 0.25)", SGD16, ()),
    Idea("+ fc2 kept", SGD16),
    Idea("+ lr 27 / sigma, at most 20 (the node's defaults)", {}),
    Idea("  fc1 kept instead of fc2", {}, ("fc1",)),
    Idea("  only fc2 trained", {}, ("fc1", "conv1", "conv2")),
)


def federation(data_dir: Path, rounds: int, out: Path, seed: int, budget: float | None,
               settings: dict | None = None, frozen: tuple[str, ...] = dpsgd.FROZEN) -> dict:
    """One ``simulate`` run; every node has only ``budget`` (None: no DP). Final accuracy and what it spent."""
    start = time.perf_counter()
    kept, dpsgd.FROZEN = dpsgd.FROZEN, frozen  # an idea under test; the node's default otherwise
    try:  # simulate merges dp_settings into every round's settings: any round setting goes through it
        history = simulate(data_dir, rounds, out, seed=seed, progress=False, echo=lambda _line: None,
                           dp_settings=settings or None, dp_budget=budget)
    finally:
        dpsgd.FROZEN = kept
        shutil.rmtree(out, ignore_errors=True)
    return {"budget": budget, "seed": seed, "rounds_trained": history[-1].round,
            "epsilon_spent": history[-1].dp_epsilon_spent, "test_accuracy": history[-1].test_accuracy,
            "accuracy_by_round": [h.test_accuracy for h in history],
            "seconds": round(time.perf_counter() - start, 1)}


def layout(work: Path, clients: int, train_images: int | None = None) -> Path:
    """``clients`` IID clients of the 5k subset (the same split every run); ``train_images``: keep only
    that many training images per client (smoke runs)."""
    data_dir = work / f"clients-{clients}"
    if not data_dir.exists():
        prepare("mnist5k", clients, data_dir, seed=0, partition="iid")
        for client in sorted(data_dir.glob("client-*")) if train_images else []:
            split = data.load_split(client, "train")
            shutil.rmtree(client / "train")
            keep = slice(0, train_images)
            data.write_shard(client / "train" / "shard-000.csv", split.images[keep], split.labels[keep],
                             split.image_ids[keep])
    return data_dir


def accuracy_runs(args: argparse.Namespace, report: Report, work: Path) -> list[dict]:
    """Per layout: ``--runs`` federations per budget and one without DP; the final global test accuracy."""
    rows = []
    for clients in args.layouts:
        data_dir = layout(work, clients, args.train_images)
        n = len(data.load_split(data_dir / "client-0", "train"))
        for budget in [*args.budgets, None]:
            runs = [federation(data_dir, args.rounds, work / "run", seed, budget)
                    for seed in range(args.runs if budget is not None else 1)]
            accuracies = [r["test_accuracy"] for r in runs]
            rows.append({"clients": clients, "train_images_per_client": n, "budget": budget, "runs": runs,
                         "median_accuracy": statistics.median(accuracies)})
            spent = max((r["epsilon_spent"] or 0.0) for r in runs)
            report(f"{clients:>7}  {n:>6}  {'none' if budget is None else f'{budget:g}':>6}  "
                   f"{100 * rows[-1]['median_accuracy']:>6.1f} %  "
                   f"{' / '.join(f'{100 * a:.1f}' for a in accuracies):<20}  {spent:>9.3f}  "
                   f"{statistics.median(r['seconds'] for r in runs):>7.0f}")
    return rows


def idea_runs(args: argparse.Namespace, report: Report, work: Path) -> list[dict]:
    """One federation at ε 3 per idea, on the first layout: each idea's effect on accuracy."""
    data_dir = layout(work, args.layouts[0], args.train_images)
    report(f"{args.layouts[0]} IID clients, {args.rounds} rounds, budget 3 (planned), delta {DEFAULT_DELTA:g}; "
           "one run each")
    rows = []
    for idea in IDEAS:
        run = federation(data_dir, args.rounds, work / "run", 0, 3.0, idea.settings, idea.frozen)
        rows.append({"idea": idea.name, **run})
        report(f"{idea.name:<55} {100 * run['test_accuracy']:>6.1f} %  {run['seconds']:>5.0f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=DP_ROUND_DEFAULTS["batch_size"],
                        help="images per step in the step-time part (default: a DP round's)")
    parser.add_argument("--steps", type=int, default=10, help="steps per contender per alternation")
    parser.add_argument("--reps", type=int, default=5, help="alternations")
    parser.add_argument("--modes", nargs="*", choices=sorted(DP_MODES), default=list(DP_MODES))
    parser.add_argument("--layouts", type=int, nargs="*", default=[5, 2, 1], help="IID clients of the 5k subset")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3, help="federations per budget and layout (0: none)")
    parser.add_argument("--ideas", action="store_true", help="also one federation at epsilon 3 per idea")
    parser.add_argument("--train-images", type=int, default=None, help="keep only this many train images "
                        "per client (smoke runs; default: all)")
    parser.add_argument("--budgets", type=float, nargs="*", default=[1.0, 3.0, 8.0], help="node epsilon budgets")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="also write the report here (and .json beside it)")
    parser.add_argument("--plot", type=Path, nargs="+", metavar="JSON",
                        help="only draw accuracy against epsilon from these results into --out (.png)")
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--steps-only", action="store_true", help="the step times alone, no accuracy table")
    parts.add_argument("--accuracy-only", action="store_true", help="the accuracy tables alone, no step times")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.out.with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    report = Report()
    report(machine())
    medians = {} if args.accuracy_only else step_times(args, report)
    accuracy: dict = {}
    if not args.steps_only:
        report("")
        accuracy = accuracy_table(args, report)
    report.save(args.out)
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps({"step_ms": medians, **accuracy}, indent=2))
        if accuracy.get("accuracy"):
            plot([args.out.with_suffix(".json")], args.out.with_suffix(".png"))


def accuracy_table(args: argparse.Namespace, report: Report) -> dict:
    """The accuracy part: per layout and budget (``accuracy_runs``), the ideas (``--ideas``), the plot."""
    defaults = (f"plain SGD at lr {privacy.DP_STEP_NOISE:g}/sigma, at most {DP_ROUND_DEFAULTS['learning_rate']:g}, "
                f"batch {DP_ROUND_DEFAULTS['batch_size']}")
    report(f"{args.rounds} rounds, delta {DEFAULT_DELTA:g}; DP rounds: the node's defaults ({defaults}, "
           f"C {privacy.DEFAULT_MAX_GRAD_NORM:g}, {'/'.join(dpsgd.FROZEN)} kept, no dropout), sigma planned "
           f"from the budget over the rounds; no DP: the round settings' defaults (Adadelta 1.0, batch 64)")
    report(f"{'clients':>7}  {'images':>6}  {'budget':>6}  {'median':>8}  {'runs (accuracy %)':<20}  "
           f"{'eps spent':>9}  {'seconds':>7}")
    work = Path(tempfile.mkdtemp(prefix="mnist-edge-privacy-"))
    try:
        result = {"accuracy": accuracy_runs(args, report, work) if args.runs else []}
        if args.ideas:
            report("")
            result["ideas"] = idea_runs(args, report, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def plot(files: list[Path], path: Path) -> None:
    """Accuracy against ε from ``files`` (this script's JSON), drawn as the docs draw it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "_ext"))
    from results_plots import draw_privacy, privacy_layouts

    draw_privacy(privacy_layouts(files), path)


if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    main()

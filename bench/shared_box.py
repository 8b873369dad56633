"""Benchmark: N clients training at once on one box, each with a given thread count.

Each client is a process running ``training.train`` (1 epoch, batch 64, fp32 and ``auto``) on its own
real images, started together; the result is the total images per second of all of them, the
median over ``--reps`` runs. It answers "how should N clients share the cores": every client with
torch's default threads (one per core, so N x cores threads fight), or each with a share
(``--threads cores/N``, what ``MNIST_EDGE_THREADS``/``TOTAL_N_CLIENTS`` give). ``--env K=V`` passes
a variable to every client, so the same script measured the removed batch-parts path
(``MNIST_EDGE_BATCH_PARTS=2``) with ``PYTHONPATH`` pointing at a checkout that had it
(bench/README.rst "Training speed").

    .venv/bin/python bench/shared_box.py --clients 2 --threads 1 [--env MNIST_EDGE_BATCH_PARTS=2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path

from perf_common import Report, cpu_tag, images, load, machine, median


def client(index: int, count: int, threads: int | None, precision: str, start, done) -> None:
    import torch

    from mnist_edge import model, training
    from mnist_edge.settings import parse_settings

    if threads:
        torch.set_num_threads(threads)
    pixels, labels = images(count)
    net = model.new_model(index)
    settings = parse_settings({"epochs": 1, "batch_size": 64, "seed": index, "precision": precision})
    training.train(net, pixels[:256], labels[:256], settings)  # warm-up: oneDNN builds its kernels
    start.wait()
    began = time.perf_counter()
    training.train(net, pixels, labels, settings)
    done.put(time.perf_counter() - began)


def run(args: argparse.Namespace) -> float:
    """Total images/s of ``--clients`` processes training together (from the common start to the last end)."""
    context = multiprocessing.get_context("spawn")
    start, done = context.Barrier(args.clients), context.Queue()
    workers = [context.Process(target=client, args=(i, args.images, args.threads, args.precision, start, done))
               for i in range(args.clients)]
    for worker in workers:
        worker.start()
    seconds = [done.get(timeout=1800) for _ in workers]
    for worker in workers:
        worker.join()
    return args.clients * args.images / max(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per client (default: torch's)")
    parser.add_argument("--images", type=int, default=3000, help="images per client (default 3000)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="a variable for every client")
    parser.add_argument("--label", default="", help="what this configuration is, for the report")
    parser.add_argument("--out", type=Path, help="append the report to this file")
    args = parser.parse_args()
    for pair in args.env:
        key, _, value = pair.partition("=")
        os.environ[key] = value  # inherited by the spawned clients
    rates = [run(args) for _ in range(args.reps)]
    report = Report()
    report(machine())
    report(f"{args.label or 'run'}: {args.clients} clients x {args.images} images, threads "
           f"{args.threads or 'default'}, env {' '.join(args.env) or '-'}, {args.precision}: total "
           f"{median(rates):.0f} images/s median of {', '.join(f'{r:.0f}' for r in rates)}; {cpu_tag()}; {load()}")
    if args.out is not None:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()

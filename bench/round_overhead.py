"""Round overhead: where one train callback's time goes besides the training steps.

One real train callback (``EdgeClient`` -> ``EdgeTasks.train``), 1 epoch on 6,000 images (the 5k
subset, repeated), timed in parts by wrapping the functions the callback calls: parameter decode
(``ScaleoutModel`` -> numpy -> the CNN), data (``data.load_split``: cold = first read of the
shard, cached = a later round), training steps (``training.train``), update serialization (the
CNN -> numpy -> ``ScaleoutModel``: ``container.to_scaleout_model``, a level-1 npz stored as it is in
the client's container); "other" is the rest (settings, metadata, logging). After one warm-up
callback (the first training in a process builds oneDNN's kernels) the cache is cleared: the
next callback reads the shard cold, the ``--reps`` after it find it cached; the report gives
their medians.

Then the update builders alone, alternating ``--reps`` x 3 times on the CNN's 4.8 MB of weights:
the client's ``ScaleoutModel.from_training_model`` with its stock numpyhelper (``np.savez_compressed``,
then the builder deflates that member again), the same with a level-1 npz (this package's first
update) and ``container.to_scaleout_model``. (An uncompressed npz stored in the container was
measured and left out: the client's re-id then does the only deflate, but the combiner's decode,
which seeks inside the deflated member, took ~3x longer; see bench/results.)
For each: the build (in the callback), what the client does with the
update after the callback (``to_builder().set_model_id(..).build()``: the client's code, which
deflates the container's member again at zlib's default level), their sum (what the node spends
before the upload), the combiner's decode (stock numpyhelper) and the bytes uploaded.
Run it with each client line's interpreter (``scaleout`` 1.0.7 and 1.1).

    .venv/bin/python bench/round_overhead.py [--images 6000 --reps 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scaleout import ScaleoutModel
from scaleoututil.helpers.plugins.numpyhelper import Helper as NumpyHelper

from mnist_edge import container, data, edge, model, runtime, training
from perf_common import Report, cpu_tag, images, load, machine, median

PARTS = (
    "decode: ScaleoutModel -> numpy",
    "decode: numpy -> CNN",
    "data",
    "training steps",
    "serialize: CNN -> numpy",
    "serialize: numpy -> ScaleoutModel",
)


class PartTimer:
    """Wraps module attributes so each call adds its wall time to a named part."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def wrap(self, owner: object, attribute: str, part: str) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        setattr(owner, attribute, timed)


def callback_parts(client, timer: PartTimer, incoming, settings: dict) -> dict[str, float]:
    """One train callback; returns seconds per part, "other" and "total"."""
    timer.seconds = dict.fromkeys(PARTS, 0.0)
    start = time.perf_counter()
    runtime.run_task(client, "train", incoming, settings)
    total = time.perf_counter() - start
    return {**timer.seconds, "other": total - sum(timer.seconds.values()), "total": total}


class Level1Helper(NumpyHelper):
    """The stock numpyhelper writing the level-1 npz: this package's first update."""

    def save(self, weights, path=None, file_type="npz"):
        path.write(model.npz_bytes(weights))
        return path


BUILDERS: dict[str, Callable[[list[np.ndarray]], ScaleoutModel]] = {
    "from_training_model, stock numpyhelper": lambda p: ScaleoutModel.from_training_model(p, NumpyHelper()),
    "from_training_model, level-1 npz": lambda p: ScaleoutModel.from_training_model(p, Level1Helper()),
    "container.to_scaleout_model (level-1 npz stored as it is)": container.to_scaleout_model,
}


def timed(function: Callable, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def compare_builders(params: list[np.ndarray], reps: int, report: Report) -> None:
    """The update builders alternating: build, the client's re-id after the callback, decode, size."""
    seconds: dict[str, dict[str, list[float]]] = {name: {"build": [], "re-id": [], "decode": []} for name in BUILDERS}
    sizes = {}
    for _rep in range(reps):
        for name, build in BUILDERS.items():
            build_s, built = timed(build, params)
            reid_s, uploaded = timed(lambda built=built: built.to_builder().set_model_id("update").build())
            decode_s, decoded = timed(uploaded.get_training_model, NumpyHelper())
            assert all(np.array_equal(a, b) for a, b in zip(decoded, params)), name
            for key, value in (("build", build_s), ("re-id", reid_s), ("decode", decode_s)):
                seconds[name][key].append(value)
            with uploaded.get_file_stream() as stream:
                sizes[name] = os.fstat(stream.fileno()).st_size
    report(
        f"update builders, {reps} alternations, medians:{'':13} {'build':>8} {'client re-id':>13} "
        f"{'sum':>9} {'combiner decode':>16} {'uploaded':>12}"
    )
    for name, parts in seconds.items():
        both = [a + b for a, b in zip(parts["build"], parts["re-id"])]
        report(
            f"  {name:58} {1e3 * median(parts['build']):6.1f} ms {1e3 * median(parts['re-id']):10.1f} ms "
            f"{1e3 * median(both):6.1f} ms {1e3 * median(parts['decode']):13.1f} ms {sizes[name]:>12,} B"
        )


def callback_report(args: argparse.Namespace, report: Report) -> None:
    """The train callback's parts: one warm-up, one cold-cache run, ``--reps`` cached runs."""
    timer = PartTimer()
    for owner, attribute, part in (
        (edge, "params_from", PARTS[0]),
        (model, "set_parameters", PARTS[1]),
        (data, "load_split", PARTS[2]),
        (training, "train", PARTS[3]),
        (model, "get_parameters", PARTS[4]),
        (edge, "to_scaleout_model", PARTS[5]),
    ):
        timer.wrap(owner, attribute, part)
    report(f"{args.images} images, 1 epoch, batch 64, precision {args.precision}, threads {args.threads}")
    settings = {"epochs": 1, "seed": 0, "precision": args.precision}
    incoming = container.to_scaleout_model(model.get_parameters(model.new_model(0)))
    with tempfile.TemporaryDirectory() as tmp:
        node = Path(tmp) / "node"
        pixels, labels = images(args.images)
        data.write_shard(node / "train" / "shard-000.csv", pixels, labels)
        client = runtime.local_client(node)
        callback_parts(client, timer, incoming, settings)  # warm-up: oneDNN builds its kernels on first use
        data.clear_cache()
        runs = [callback_parts(client, timer, incoming, settings)]  # cold: reads the shard
        runs += [callback_parts(client, timer, incoming, settings) for _ in range(args.reps)]
    cold, warm = runs[0], {key: median([run[key] for run in runs[1:]]) for key in runs[0]}
    report(f"{'part':36} {'cold cache':>16} {'cached (median)':>20}")
    for key in (*PARTS, "other", "total"):
        report(
            f"{key:36} {1e3 * cold[key]:9.1f} ms {100 * cold[key] / cold['total']:4.1f}% "
            f"{1e3 * warm[key]:12.1f} ms {100 * warm[key] / warm['total']:4.1f}%"
        )
    overhead = 1 - warm["training steps"] / warm["total"]
    report(
        f"everything except the training steps, cached: {100 * overhead:.2f} % of the callback (target <= 3 %); "
        f"cold: {100 * (1 - cold['training steps'] / cold['total']):.2f} %; {cpu_tag()}; {load()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--reps", type=int, default=3, help="callbacks with the cache warm (default 3)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--builders-only", action="store_true", help="only the update builders (no callback)")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = Report()
    report(machine())
    if not args.builders_only:
        callback_report(args, report)
    compare_builders(model.get_parameters(model.new_model(0)), 3 * args.reps, report)
    report(f"(builders: {cpu_tag()}; {load()})")
    report.save(args.out)


if __name__ == "__main__":
    main()

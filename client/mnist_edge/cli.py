"""``python -m mnist_edge COMMAND``: the tools around the compute package.

Each command is a small function; errors the user can fix (a bad path, a bad file, a bad
argument) print one line naming what is wrong and exit 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .data import DataError
from .model import ModelFileError
from .prepare import SourceError
from .settings import SettingsError

USER_ERRORS = (DataError, ModelFileError, SourceError, SettingsError, FileNotFoundError)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    counts = prepare(args.source, args.clients, args.out, seed=args.seed, test_fraction=args.test_fraction)
    for i, count in enumerate(counts):
        print(f"client-{i}: {count['train']} train, {count['test']} test")
    print(f"wrote {len(counts)} clients to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train and validate one client through the registered callbacks, starting from the seed."""
    from . import edge, model

    client = edge.local_client(args.data)
    seed = edge.to_scaleout_model(model.load_npz(args.seed_model))
    before = edge.run_task(client, "validate", seed, model_id=seed.model_id)
    print(f"seed model:      test accuracy {before['test_accuracy']:.4f}")
    trained, meta = edge.run_task(client, "train", seed, {"epochs": args.epochs}, model_id=seed.model_id)
    after = edge.run_task(client, "validate", trained, model_id=trained.model_id)
    print(f"after {args.epochs} epoch(s): test accuracy {after['test_accuracy']:.4f} "
          f"({meta['training_metadata']['num_examples']} training images, data {meta['data_fingerprint'][:12]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mnist_edge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="split an MNIST source into per-client shard directories")
    p.add_argument("--source", default="mnist5k", help="mnist5k (offline, bundled), MNIST IDX files, or mnist.npz")
    p.add_argument("--clients", type=int, required=True, help="number of client directories to write")
    p.add_argument("--out", type=Path, required=True, help="output directory (client-<i>/train, client-<i>/test)")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (same seed, same shards)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of each client's rows held out as test")
    p.set_defaults(func=cmd_prepare)

    p = commands.add_parser("demo", help="train and validate one client through the edge callbacks")
    p.add_argument("--data", type=Path, required=True, help="a client's data directory (train/, test/)")
    p.add_argument("--seed-model", type=Path, default=Path("seed/seed.npz"))
    p.add_argument("--epochs", type=int, default=1)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

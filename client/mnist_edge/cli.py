"""``python -m mnist_edge COMMAND``: the tools around the compute package.

Each command is a small function; errors the user can fix (a bad path, a bad file, a bad
argument) print one line naming what is wrong and exit 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from . import aggregate, lineage, privacy, simulate, standalone
from .data import DataError
from .model import ModelFileError
from .partition import PARTITIONS, PartitionError
from .paths import PathError
from .prepare import SourceError
from .privacy import PrivacyError
from .settings import SettingsError
from .simulate import SimulationError
from .storage import S3Config, StorageError
from .training import TrainingDiverged

# OSError (paths.OutputError among them): an output path that cannot be written (its message names the path).
USER_ERRORS = (DataError, ModelFileError, SourceError, SettingsError, PartitionError, SimulationError, PrivacyError,
               PathError, TrainingDiverged, StorageError, OSError)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import format_histogram, prepare

    counts = prepare(args.source, args.clients, args.out, seed=args.seed, test_fraction=args.test_fraction,
                     partition=args.partition, alpha=args.alpha, classes_per_client=args.classes_per_client)
    print(format_histogram(counts))
    print(f"wrote {len(counts)} clients ({args.partition}) to {args.out}; label histogram in "
          f"{args.out / 'partition.json'}")
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
    p.add_argument("--partition", choices=PARTITIONS, default="iid",
                   help="iid (default), dirichlet (with --alpha) or shards (with --classes-per-client)")
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration: small = strong skew")
    p.add_argument("--classes-per-client", type=int, default=None, help="digits each client holds (shards)")
    p.set_defaults(func=cmd_prepare)

    simulate.add_command(commands)

    standalone.add_commands(commands)
    aggregate.add_command(commands)
    privacy.add_command(commands)

    p = commands.add_parser("lineage", help="where a model came from: its data, code and versions (local or s3://)")
    p.add_argument("model", metavar="MODEL", help="a model file or its meta, local or s3://bucket/key[?versionId=V]")
    p.add_argument("--json", action="store_true", help="print the meta and the check as JSON")
    p.set_defaults(func=lineage.cmd_lineage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        args.s3 = S3Config.from_environ(os.environ)  # the object store's configuration, read once here
        return func(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

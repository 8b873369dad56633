"""``python -m mnist_edge COMMAND``: every command's arguments, and nothing else.

Each command calls one library function with plain arguments. The node's environment is read
here, once, where the process starts. Modules are imported when their command runs, so the
commands that work without Scaleout (``train``, ``predict``, ...) never load it. An error the user
can fix (a bad path, file, argument or node variable) prints one line naming it and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path

from .errors import UserError
from .node import DEFAULT_DELTA, DP_DELTA, DP_EPSILON, DP_ROUNDS, LEDGER_NAME, STATE_DIR
from .partition import PARTITIONS
from .settings import DP_ROUND_DEFAULTS, DP_SETTINGS, TrainSettings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, OSError) as error:
        print(f"error: {getattr(error, 'local_message', None) or error}", file=sys.stderr)
        if getattr(error, "exit_now", False):  # a data-parallel job whose peer is gone: no teardown
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2


def _store():
    """How to reach an ``s3://`` location (``S3_ENDPOINT``, the ``AWS_*`` variables), read here, once."""
    from .storage import S3Config

    return S3Config.from_environ(os.environ)


def _configure_process() -> None:
    """Threads (``MNIST_EDGE_THREADS``, or a share of the box) and the allocator, for commands that train."""
    from . import hardware, node

    hardware.configure_process(node.threads_from(os.environ, hardware.cpu_count()), os.environ)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import format_histogram, prepare

    counts = prepare(args.source, args.clients, args.out, seed=args.seed, test_fraction=args.test_fraction,
                     partition=args.partition, alpha=args.alpha, classes_per_client=args.classes_per_client)
    print(format_histogram(counts))
    print(f"wrote {len(counts)} clients ({args.partition}) to {args.out}; label histogram in "
          f"{args.out / 'partition.json'}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import simulate

    _configure_process()
    history = simulate(args.data, args.rounds, args.out, epochs=args.epochs, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, clients_per_round=args.clients_per_round,
                       seed=args.seed, init=args.init, progress=not args.no_progress,
                       dp_settings=_dp_settings(args), dp_budget=args.dp_budget, dp_delta=args.dp_delta,
                       dp_rounds=args.dp_rounds)
    final = history[-1]
    print(f"final global test_accuracy {final.test_accuracy:.4f} after {final.round} rounds")
    print(f"curves: {args.out / 'curves.png'}  history: {args.out / 'history.csv'}  "
          f"model: {args.out / 'global.npz'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from . import node, standalone

    settings = {f.name: getattr(args, f.name) for f in fields(TrainSettings) if getattr(args, f.name, None) is not None}
    local = None if args.dataset.startswith("s3://") else standalone.dataset_directory(args.dataset)
    limits = node.privacy_from(os.environ, local, Path.cwd(), None if args.ledger is None else args.ledger.absolute())
    _configure_process()
    standalone.train(args.dataset, args.model, settings, limits, init=args.init, ranks=node.ranks_from(os.environ),
                     store=_store())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from . import standalone

    _configure_process()
    standalone.predict(args.model, args.dataset, args.result, store=_store())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import standalone

    standalone.convert(args.source, args.out, "pth")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from . import standalone

    standalone.convert(args.source, args.out, "npz")
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from . import aggregate, meta

    written, record = aggregate.aggregate(args.model_set, args.out, _store())
    into = " and ".join(written) if isinstance(written, list) else f"{written} and {meta.meta_path(written)}"
    print(f"aggregated {len(record['parents'])} models ({record['num_examples']} examples, "
          f"round {record['round']}) into {into}")
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    from . import hardware, node, privacy

    if args.ledger is None:
        limits = node.NodeConfig.from_environment(os.environ, Path.cwd(), hardware.cpu_count()).privacy
    else:
        limits = node.privacy_from(os.environ, Path.cwd(), Path.cwd(), args.ledger.absolute())
    print(privacy.describe(limits, full=args.full))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    """Print where a model came from; exit 1 when its meta names another model file."""
    import json

    from . import lineage
    found = lineage.find_lineage(args.model, _store())
    if args.json:
        print(json.dumps({"model": found.model, "meta": found.meta, "meta_names_this_model": found.matches,
                          "document": found.document}, indent=2))
    else:
        print(lineage.format_lineage(found))
    return 1 if found.matches is False else 0


def _dp_settings(args: argparse.Namespace) -> dict[str, float]:
    return {key: value for key in DP_SETTINGS if (value := getattr(args, key)) is not None}


def _add_dp_arguments(p: argparse.ArgumentParser) -> None:
    """``--dp-noise-multiplier``, ``--dp-max-grad-norm``, ``--dp-epsilon``: the round settings' names."""
    p.add_argument("--dp-noise-multiplier", type=float, metavar="SIGMA",
                   help="DP-SGD noise multiplier (default 1.0 when DP runs)")
    p.add_argument("--dp-max-grad-norm", type=float, metavar="C",
                   help="per-sample gradient clip norm (default 1.0 when DP runs)")
    p.add_argument("--dp-epsilon", type=float, metavar="EPS", help="target epsilon of this run (sets sigma)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mnist_edge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = TrainSettings()

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

    p = commands.add_parser("simulate", help="run a FedAvg federation over prepared clients on this machine")
    p.add_argument("--data", type=Path, required=True, help="`prepare` output (client-<i>/...)")
    p.add_argument("--rounds", type=int, required=True, help="federated rounds")
    # Unset: the round settings' defaults (a DP round's are the node's DP defaults, privacy.DP_ROUND_DEFAULTS)
    p.add_argument("--epochs", type=int, help=f"local epochs per round (default {defaults.epochs})")
    p.add_argument("--batch-size", type=int,
                   help=f"local batch size (default {defaults.batch_size}; "
                        f"DP rounds: {DP_ROUND_DEFAULTS['batch_size']})")
    p.add_argument("--learning-rate", type=float,
                   help=f"learning rate (default {defaults.learning_rate:g} for Adadelta; DP rounds: "
                        f"27/sigma, at most {DP_ROUND_DEFAULTS['learning_rate']:g}, plain SGD)")
    p.add_argument("--clients-per-round", type=int, default=None, help="clients drawn per round (default all)")
    p.add_argument("--seed", type=int, default=0, help="initial model, client sampling and local shuffling")
    p.add_argument("--init", type=Path, default=None, help="start from this seed/global .npz")
    p.add_argument("--out", type=Path, required=True, help="run directory for history, curves and models")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_dp_arguments(p)
    p.add_argument("--dp-budget", type=float, metavar="EPS",
                   help=f"every client's node budget ({DP_EPSILON}): with it every round runs DP-SGD")
    p.add_argument("--dp-delta", type=float, metavar="DELTA",
                   help=f"every client's {DP_DELTA} (default {DEFAULT_DELTA:g})")
    p.add_argument("--dp-rounds", type=int, metavar="N",
                   help=f"every client's {DP_ROUNDS}: the DP rounds a budget is planned for (default --rounds)")
    p.set_defaults(func=cmd_simulate)

    p = commands.add_parser("train", help="train the CNN on a CSV shard or directory; write a .pth")
    p.add_argument("--model", required=True, metavar="OUT", help="model file to write (.pth; .npz for the "
                   "federation), or an existing directory (mnist.pth inside)")
    p.add_argument("--epochs", "--epoch", type=int, metavar="N",
                   help=f"passes over the data (default {defaults.epochs})")
    p.add_argument("--batch-size", type=int, metavar="B", help=f"default {defaults.batch_size}")
    p.add_argument("--learning-rate", type=float, metavar="L", help=f"default {defaults.learning_rate}")
    p.add_argument("--optimizer", metavar="O", help=f"adadelta, sgd or adam (default {defaults.optimizer})")
    p.add_argument("--seed", type=int, metavar="S",
                   help="fixes initial weights, shuffling and dropout (default: the seed model's weights)")
    p.add_argument("--precision", metavar="P", help=f"auto, fp32 or bf16 (default {defaults.precision})")
    p.add_argument("--init", metavar="MODEL", help="start from this .pth or .npz instead of fresh weights")
    _add_dp_arguments(p)
    p.add_argument("--ledger", metavar="PATH", type=Path, default=None,
                   help=f"privacy ledger DP training charges (default: {STATE_DIR}/{LEDGER_NAME} beside the "
                        "dataset's shards, or MNIST_EDGE_DP_LEDGER)")
    p.add_argument("dataset", metavar="DATASET", help="a CSV shard or a directory of shards")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("predict", help="predict a CSV shard or directory into image_id,label,confidence")
    p.add_argument("--model", required=True, help="a .pth state_dict or a seed/global .npz")
    p.add_argument("dataset", metavar="DATASET", help="a CSV shard or a directory of shards; labels optional")
    p.add_argument("result", metavar="RESULT", help="output CSV, or a directory (result.csv inside)")
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("export", help="federation .npz -> PyTorch .pth state_dict")
    p.add_argument("source", metavar="MODEL.npz")
    p.add_argument("out", metavar="OUT.pth")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("import", help="PyTorch .pth state_dict -> federation .npz")
    p.add_argument("source", metavar="MODEL.pth")
    p.add_argument("out", metavar="OUT.npz")
    p.set_defaults(func=cmd_import)

    p = commands.add_parser("aggregate", help="FedAvg a directory of trained models (weighted by num_examples)")
    p.add_argument("model_set", metavar="MODEL_SET_DIR",
                   help="a directory of model directories, each with mnist.pth and mnist.xdata-meta.json")
    p.add_argument("out", metavar="OUT.pth", help="model file to write, or a directory (mnist.pth inside)")
    p.set_defaults(func=cmd_aggregate)

    p = commands.add_parser("privacy", help="print this node's privacy ledger and remaining budget")
    p.add_argument("--ledger", type=Path, default=None,
                   help=f"ledger file (default: the node's, $SCALEOUT_DATA_DIR/{STATE_DIR}/{LEDGER_NAME})")
    p.add_argument("--full", action="store_true",
                   help="recompute every round's epsilon instead of starting from the head's verified checkpoint")
    p.set_defaults(func=cmd_privacy)

    p = commands.add_parser("lineage", help="where a model came from: its data, code and versions (local or s3://)")
    p.add_argument("model", metavar="MODEL", help="a model file or its meta, local or s3://bucket/key[?versionId=V]")
    p.add_argument("--json", action="store_true", help="print the meta and the check as JSON")
    p.set_defaults(func=cmd_lineage)
    return parser


if __name__ == "__main__":
    sys.exit(main())

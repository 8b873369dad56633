"""``node_status``: what a server operator may ask a node, and all it gets back.

Counts, fingerprints, versions, the precision it will train in, and its privacy budget (spent,
left, δ) — never an image, a label list, a message quoting a file, or a path outside the data
directory. A split or a ledger that cannot be read is reported as such, without its reason (the
reason can quote a file); the node's own log has it.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import torch

from . import __version__, data, hardware, ledger
from .node import NodeConfig
from .report import json_safe


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def split_status(node: NodeConfig, split: str) -> dict[str, Any]:
    """How many usable images a split holds and their fingerprint; ``present`` False when there is none."""
    try:
        if not data.has_split(node.data_dir, split):
            return {"present": False}
        found = data.load_split(node.data_dir, split, labels_required=split != "predict")
    except data.DataError:
        return {"present": True, "usable": False}
    return {"present": True, "usable": True, "images": len(found), "rows_skipped": found.rows_skipped,
            "shards": len(found.files), "data_fingerprint": found.fingerprint}


def privacy_status(node: NodeConfig) -> dict[str, Any]:
    """The node's budget and what its ledger says was spent (``ledger`` "unreadable" when it cannot be verified)."""
    limits = node.privacy
    status: dict[str, Any] = {"budget_epsilon": limits.epsilon, "delta": limits.delta, "planned_rounds": limits.rounds,
                              "precision": "fp32"}  # DP rounds compute in fp32 (the clip must be exact)
    if limits.ledger is None:
        return {**status, "ledger": "none"}
    try:
        charged = ledger.read(limits.ledger)
    except ledger.LedgerError:
        return {**status, "ledger": "unreadable"}
    left = None if limits.epsilon is None else max(limits.epsilon - charged.spent, 0.0)
    rounds_left = None if limits.epsilon is None else max(limits.rounds - charged.count, 0)
    return {**status, "ledger": "verified", "charged_rounds": charged.count,
            "spent_epsilon": charged.spent, "left_epsilon": left, "planned_rounds_left": rounds_left}


def node_status(node: NodeConfig) -> dict[str, Any]:
    """The answer to ``node_status``, plain JSON."""
    device = hardware.select_device()
    return json_safe({
        "package": "mnist-edge", "package_version": __version__, "scaleout_version": _version("scaleout"),
        "torch_version": torch.__version__, "device": device.type,
        "precision": "bf16" if hardware.use_bf16("auto", device) else "fp32",
        "threads": torch.get_num_threads(),
        "client_number": node.client_number, "total_clients": node.total_clients,
        "splits": {split: split_status(node, split) for split in ("train", "test", "predict")},
        "privacy": privacy_status(node),
    })

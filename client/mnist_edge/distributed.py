"""Data-parallel training on torch's own engine: N processes, one model, gradients averaged by DDP.

Under ``torchrun`` (Kubeflow Trainer) or a launcher that sets ``MASTER_ADDR``/``RANK``/``WORLD_SIZE``
(Training Operator v1), ``python -m mnist_edge train`` joins a process group (gloo on the CPU, NCCL
on CUDA) with a short timeout, so a rank that dies makes the others fail instead of wait. Each rank
reads its own disjoint part of the shards (whole files when there are enough, else every N-th
row), trains on a batch of ``batch_size / N`` so the job's batch is the one asked for, and
``DistributedDataParallel`` averages the gradients; the ranks then check that they hold the same
weights, and rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import data, hardware, training
from .errors import UserError
from .node import Ranks
from .settings import TrainSettings


class RankLost(UserError, RuntimeError):
    """A collective failed: another rank died or stopped answering within the timeout.

    The process group cannot be torn down cleanly then (gloo's destructor waits on a worker that
    waits on the interpreter), so the command line exits at once after saying so (``exit_now``).
    """

    exit_now = True


@dataclass(frozen=True)
class Part:
    """What one rank trains on: which shard files, and every ``stride``-th row of them from ``offset``."""

    files: list[Path]
    offset: int = 0
    stride: int = 1


def part_of(files: list[Path], ranks: Ranks) -> Part:
    """Whole files when every rank can have one, else every rank reads them all and keeps every N-th row."""
    if len(files) >= ranks.world_size:
        return Part(files[ranks.rank :: ranks.world_size])
    return Part(files, ranks.rank, ranks.world_size)


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join the job's process group (``env://``: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) and leave it."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size,
                                timeout=timedelta(seconds=ranks.timeout))
    except (RuntimeError, ValueError) as error:
        raise RankLost(f"rank {ranks.rank} of {ranks.world_size}: cannot join the job's process group "
                       f"({_first_line(error)}); check MASTER_ADDR and MASTER_PORT") from None
    yield  # on an error the group is left as it is: tearing it down with a peer gone can hang
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(ranks: Ranks, what: str) -> Iterator[None]:
    """Turn a failed collective into one line naming this rank and what it was doing."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as error:
        raise RankLost(f"rank {ranks.rank} of {ranks.world_size}: lost the other ranks while {what} "
                       f"({_first_line(error)}); the job stops and writes nothing") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def wrap(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` under DDP: each backward averages the gradients over the ranks."""
    net.to(device)
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def gather(ranks: Ranks, value: Any, what: str) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order."""
    found: list[Any] = [None] * ranks.world_size
    with collective(ranks, what):
        dist.all_gather_object(found, value)
    return found


def load_part(files: list[Path], location: Path, ranks: Ranks) -> tuple[data.Dataset, data.Dataset, dict]:
    """This rank's part of the dataset, the job's whole dataset as one process would describe it
    (fingerprint, skipped rows, repeated ids; no images), and what each rank read."""
    part = part_of(files, ranks)
    mine = data.load_files(part.files, location)
    skipped = mine.rows_skipped if part.offset == 0 else 0  # a row-split rank re-reads the others' bad rows
    if part.stride > 1:
        mine = mine.part(part.offset, part.stride)
    seen = {"rank": ranks.rank, "files": [p.name for p in part.files], "offset": part.offset, "stride": part.stride,
            "rows": len(mine), "image_ids_sha256": hash_ids(mine.image_ids), "sha256": list(mine.shard_sha256),
            "skipped": skipped, "ids": mine.image_ids}
    everyone = gather(ranks, seen, "reading the shards")
    hashes = {f: h for r in everyone for f, h in zip(r["files"], r["sha256"])}
    ids = np.concatenate([r["ids"] for r in everyone])
    ordered = tuple(hashes[p.name] for p in files)  # by name: each rank stages the files in a place of its own
    whole = data.Dataset(images=np.empty((0, 28, 28), np.uint8), labels=np.empty(0, np.int64), image_ids=ids,
                         files=list(files), rows_skipped=sum(r["skipped"] for r in everyone), bad_rows=[],
                         fingerprint=data.fingerprint(ordered), duplicate_image_ids=int(len(ids) - len(np.unique(ids))),
                         shard_sha256=ordered)
    job = {"world_size": ranks.world_size,
           "ranks": [{k: r[k] for k in ("rank", "files", "offset", "stride", "rows", "image_ids_sha256")}
                     for r in everyone]}
    return mine, whole, job


def hash_ids(image_ids: np.ndarray) -> str:
    """sha256 of a rank's image ids as it trains on them (what it saw, to compare with the input)."""
    return hashlib.sha256(np.ascontiguousarray(image_ids, dtype=np.int64).tobytes()).hexdigest()


def weights_sha256(net: nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in net.state_dict().values():
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_same_weights(net: nn.Module, ranks: Ranks) -> str:
    """Every rank must end with the same weights (DDP's promise): checked before rank 0 writes them."""
    mine = weights_sha256(net)
    everyone = gather(ranks, mine, "comparing the trained weights")
    if len(set(everyone)) != 1:
        raise RankLost(f"rank {ranks.rank} of {ranks.world_size}: the ranks ended with different weights "
                       f"({', '.join(h[:12] for h in everyone)}); nothing is written")
    return mine


def train(net: nn.Module, mine: data.Dataset, settings: TrainSettings, ranks: Ranks, device: torch.device,
          on_batch: training.Hook = None, on_metrics: training.MetricsHook = None) -> training.TrainResult:
    """This rank's share of one training run, under DDP; the result is the whole job's.

    Each rank steps on ``batch_size / N`` images (rounded up), so the job's batch is the one asked
    for; its shuffling and dropout draw from the round's seed and its rank. Ranks whose part runs
    out of batches first keep answering the others' gradient averaging (``DDP.join``).
    """
    local = replace(settings, batch_size=max(1, -(-settings.batch_size // ranks.world_size)),
                    seed=None if settings.seed is None else rank_seed(settings.seed, ranks.rank))
    net.to(device, memory_format=hardware.memory_format_for(device))  # before DDP: it keeps these tensors
    ddp = wrap(net, device)
    with collective(ranks, "training"), ddp.join():
        result = training.train(ddp, mine.images, mine.labels, local, on_batch, on_metrics, device)
    parts = gather(ranks, (result.num_examples, result.training_loss, result.training_accuracy, result.batches),
                   "adding up the ranks' results")
    n = sum(p[0] for p in parts)
    return training.TrainResult(n, sum(p[0] * p[1] for p in parts) / n, sum(p[0] * p[2] for p in parts) / n,
                                max(p[3] for p in parts), result.precision)


def rank_seed(seed: int, rank: int) -> int:
    """A rank's own seed from the run's: distinct per rank, reproducible."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)

"""One batch's gradient on every core: the batch in parts, each part single-threaded on its own core.

torch's intra-op threads split every operator of a training step across the cores and meet at a
barrier after each one, so when another process takes a core for a moment every operator waits
for it. Here each core computes the gradient of its part of the batch with one intra-op thread,
and autograd sums the parts' gradients into ``.grad`` (each part's loss is its share of the batch
mean), so the optimizer still takes one step for the gradient of the whole batch: the same update,
with one meeting per batch instead of one per operator. On the 2-core machine measured it was far
faster while other work shared the cores, and slower on the quiet machine (README "Performance"),
so batches stay whole unless a node sets ``MNIST_EDGE_BATCH_PARTS``.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .settings import SettingsError

PARTS_ENV = "MNIST_EDGE_BATCH_PARTS"
"""Node setting (never a round setting): the number of parts, default 1 (whole batches)."""


class PartsSettingError(SettingsError):
    """``MNIST_EDGE_BATCH_PARTS`` holds something other than a positive integer."""


def batch_parts(device: torch.device) -> int:
    """How many parts to split a batch into on the CPU: ``MNIST_EDGE_BATCH_PARTS``, default 1.

    Whole batches on torch's intra-op threads were faster on the quiet 2-core machine measured
    (``bench/train_ideas.py``: 1.20x the reference step against 1.06x in 2 parts); 2 parts on 2
    threads won by far while other processes shared the cores (1.68x against 1.08x), so a node
    whose cores are shared can ask for them. Autograd adds the parts' gradients in the order the
    parts finish: two addends commute exactly, so 2 parts train reproducibly from the seed, more
    can differ in the last bits. CUDA batches stay whole.
    """
    if device.type != "cpu":
        return 1
    chosen = os.environ.get(PARTS_ENV, "1").strip()
    if not chosen.isdigit() or int(chosen) < 1:
        raise PartsSettingError(f"{PARTS_ENV} must be a whole number >= 1, got {chosen!r}")
    return int(chosen)


def dropout_generators(parts: int, seed: int | None, device: torch.device) -> list[torch.Generator]:
    """One generator per part, so each part's dropout masks are reproducible from ``seed``."""
    generators = [torch.Generator(device) for _ in range(parts)]
    for part, generator in enumerate(generators):
        if seed is None:
            generator.seed()
        else:
            state = np.random.SeedSequence([seed % 2**64, part]).generate_state(1, np.uint64)[0]
            generator.manual_seed(int(state))
    return generators


class BatchGradient:
    """Puts into ``net``'s ``.grad`` the gradient of the mean loss over a batch, in ``parts`` parts.

    Call it with one batch (after ``zero_grad``); it returns the batch's summed loss and its
    count of correct predictions as tensors (no device sync). Use it as a context manager: the
    part threads stop on exit.
    """

    def __init__(self, net: nn.Module, parts: int, bf16: bool, device: torch.device, seed: int | None) -> None:
        self.net, self.parts, self.bf16, self.device_type = net, parts, bf16, device.type
        self.generators = dropout_generators(parts, seed, device)
        self.threads = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(parts - 1, "batch-part", torch.set_num_threads, (1,)) if parts > 1 else None

    def __enter__(self) -> "BatchGradient":
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            torch.set_num_threads(self.threads)  # a part thread's start set the default for new threads

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = len(y)
        parts = min(self.parts, batch)
        if parts == 1:
            return self._part(x, y, batch, self.generators[0])
        xs, ys = torch.tensor_split(x, parts), torch.tensor_split(y, parts)
        torch.set_num_threads(1)
        try:
            futures: list[Future] = [self._pool.submit(self._part, xs[i], ys[i], batch, self.generators[i])
                                     for i in range(1, parts)]
            results = [self._part(xs[0], ys[0], batch, self.generators[0])]
            results += [future.result() for future in futures]
        finally:
            torch.set_num_threads(self.threads)
        return sum(r[0] for r in results), sum(r[1] for r in results)

    def _part(self, x: torch.Tensor, y: torch.Tensor, batch: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one part; its loss is scaled by its share of the batch."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.net(x, generator)
        loss_sum = F.nll_loss(output.float(), y, reduction="sum")
        (loss_sum / batch).backward()
        with torch.no_grad():
            return loss_sum.detach(), (output.argmax(1) == y).sum()

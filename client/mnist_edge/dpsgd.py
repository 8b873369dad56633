"""DP-SGD for one round with Opacus's own pieces, and nothing written by hand.

Poisson sampling of each batch with rate q (``DPDataLoader``), per-sample clipping to C and
Gaussian noise σ·C on the layers the round trains: every layer but :data:`FROZEN` (the classifier
``fc2`` keeps the global model's values and takes no noise), with dropout off. Ghost clipping
(``GradSampleModuleFastGradientClipping`` with ``DPOptimizerFastGradientClipping`` and
``DPLossFastGradientClipping``) is the fastest mode on this CNN, see ``bench/privacy.py``.
DP rounds compute in float32: bf16 autocast runs, but per-sample norms in bf16 (8 significant
bits) would make the clip to C, and so the privacy guarantee, approximate. Sampling and noise
come from the operating system's entropy, never from the round's ``seed``: a server that knew
them could replay the batches and subtract the noise.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from . import hardware, training
from .settings import TrainSettings

GRAD_SAMPLE_MODE = "ghost"
PRECISION = "fp32"
FROZEN = ("fc2",)
"""Layers a DP round does not train (``bench/privacy.py --ideas``: the noise lands on fewer weights)."""


@dataclass(frozen=True)
class RoundPlan:
    """What one DP round will do, fixed before training so it can be charged first."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float
    expected_batch_size: int
    settings: TrainSettings  # what the round trains with: the round's own, the node's DP defaults elsewhere
    rounds_left: int | None = None  # planned DP rounds left after this one; None: no budget to plan


class _Images(torch.utils.data.Dataset):
    """The node's images as a dataset whose batch is one tensor gather (``__getitems__``), not n calls."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.labels[index]


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS's entropy: what nobody outside the node can know or choose."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator


@dataclass
class PrivateTraining:
    """The CNN wrapped for DP-SGD: clipping and noise live in Opacus's module, optimizer and loss."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One DP-SGD step (fp32); returns the output and the batch's mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        output = self.module(x)
        loss = self.criterion(output, y)
        loss.backward()
        self.optimizer.step()
        return output, loss.detach()

    def close(self) -> nn.Module:
        """Hooks and per-sample state removed: the plain CNN again."""
        return self.module.to_standard_module()


def make_private(net: nn.Module, plan: RoundPlan, device: torch.device,
                 mode: str = GRAD_SAMPLE_MODE) -> PrivateTraining:
    """Wrap ``net`` (on ``device``) with Opacus for ``plan``; ``mode`` is a ``grad_sample_mode``.

    Only the parameters that require a gradient are clipped, noised and stepped (see :func:`round_layers`).
    """
    settings = plan.settings
    ghost = mode == "ghost"
    extra = {"max_grad_norm": plan.max_grad_norm, "use_ghost_clipping": True} if ghost else {}
    module = prepare_module(net, mode, batch_first=True, loss_reduction="mean", **extra)
    module.forbid_grad_accumulation()  # Poisson sampling: one backward per step
    optimizer_class = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=mode)
    trained = [p for p in net.parameters() if p.requires_grad]
    inner = training.make_optimizer(settings.optimizer, trained, settings.learning_rate)
    optimizer = optimizer_class(inner,
                                noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                                expected_batch_size=plan.expected_batch_size, loss_reduction="mean",
                                generator=secret_generator(device))
    nll = nn.NLLLoss()
    criterion = DPLossFastGradientClipping(module, optimizer, nll, "mean") if ghost else nll
    return PrivateTraining(module, optimizer, criterion)


@contextmanager
def round_layers(net: nn.Module, frozen: tuple[str, ...] | None = None) -> Iterator[None]:
    """``frozen`` layers (default :data:`FROZEN`) take no gradient and dropout is off for the round;
    both restored after.

    The CNN is the node's and trains the next round (DP or not) as it was.
    """
    params = [p for name in (FROZEN if frozen is None else frozen) for p in getattr(net, name).parameters()]
    dropouts = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    try:
        for p in params:
            p.requires_grad_(False)
        for m in dropouts:
            m.eval()
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        for m in dropouts:
            m.train()


def train_private(
    net: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    plan: RoundPlan,
    on_batch: training.Hook = None,
    on_metrics: training.MetricsHook = None,
    device: torch.device | None = None,
) -> training.TrainResult:
    """DP-SGD for ``plan.steps`` Poisson-sampled batches with ``plan.settings``; hooks as in :func:`training.train`.

    ``on_batch`` runs before every batch (abort checks), ``on_metrics`` every
    ``training.LOG_EVERY_BATCHES`` batches and at every epoch's end. Sampling and noise are secret,
    so ``settings.seed`` changes nothing here. An empty batch (Poisson sampling allows it) still
    takes its noisy step.
    """
    device = device or hardware.select_device()
    settings = plan.settings
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    y_all = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    loader = DPDataLoader(_Images(x_all, y_all), sample_rate=plan.sample_rate, collate_fn=_as_batch,
                          generator=secret_generator())
    if len(loader) * settings.epochs != plan.steps:
        raise AssertionError(f"planned {plan.steps} steps, the sampler draws {len(loader)} per epoch")
    net.to(device).train()
    with round_layers(net):
        private = make_private(net, plan, device)
        try:
            with warnings.catch_warnings():  # the first conv's input needs no gradient: torch says so every step
                warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                loss, accuracy, batches = _epochs(private, loader, settings.epochs, device, on_batch, on_metrics)
        finally:
            private.close()
    training.check_finite_weights(net, batches)
    return training.TrainResult(len(y_all), loss, accuracy, batches, PRECISION)


def _epochs(
    private: PrivateTraining,
    loader: DPDataLoader,
    epochs: int,
    device: torch.device,
    on_batch: training.Hook,
    on_metrics: training.MetricsHook,
) -> tuple[float, float, int]:
    """The loop of :func:`train_private`: (loss, accuracy) of the last epoch and the batches run."""
    window = training.MetricWindow(on_metrics, device)
    for _epoch in range(epochs):
        for x_u8, y in loader:
            if on_batch is not None:
                on_batch()
            y = y.to(device)
            output, loss = private.step(training.to_input(x_u8, device), y)
            if len(y):
                window.add(loss * len(y), (output.argmax(1) == y).sum(), len(y))
            else:  # a Poisson batch may be empty: it still took its noisy step, but has no loss
                window.add(torch.zeros(()), 0, 0)
        window.end_epoch()
    return (*window.last_epoch(), window.batches)

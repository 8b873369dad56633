"""Train, evaluate and predict loops: plain torch on uint8 image arrays, no scaleout import.

The edge callbacks, the local simulation and the standalone commands all call these, so
the learning code exists once. Hooks (``on_batch``, ``on_metrics``) let the caller check for
task abort and report progress without this module knowing who is listening.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .hardware import keep_freed_memory, memory_format_for, select_device, use_bf16
from .parallel import BatchGradient, batch_parts
from .settings import TrainSettings

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
LOG_EVERY_BATCHES = 50
EVAL_BATCH = 1000

Metrics = dict[str, float]


class TrainingDiverged(ArithmeticError):
    """The loss or the weights stopped being finite: nothing of this run may leave the node."""


@dataclass(frozen=True)
class TrainResult:
    """What one local training run did; loss and accuracy are over its last epoch."""

    num_examples: int
    epochs: int
    training_loss: float
    training_accuracy: float
    batches: int
    precision: str  # what the compute used: "bf16" or "fp32" (``auto`` resolved)


def to_input(
    images_u8: torch.Tensor,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 (B, 28, 28) -> normalised float32 (B, 1, 28, 28) on ``device``."""
    x = images_u8.to(device, non_blocking=True).unsqueeze(1).float()
    x = x.mul_(1.0 / (255.0 * MNIST_STD)).sub_(MNIST_MEAN / MNIST_STD)
    return x.contiguous(memory_format=memory_format)


def make_optimizer(name: str, params, learning_rate: float) -> torch.optim.Optimizer:
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=learning_rate)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}")


def train(
    net: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    settings: TrainSettings,
    on_batch: Callable[[], None] | None = None,
    on_metrics: Callable[[Metrics], None] | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """Train ``net`` in place for ``settings.epochs`` epochs, reshuffling every epoch.

    ``on_batch`` runs before every batch (abort checks raise from there, so training stops
    at once); ``on_metrics`` gets the running ``training_loss``/``training_accuracy`` every
    ``LOG_EVERY_BATCHES`` batches and at the end of every epoch.
    """
    device = device or select_device()
    if device.type == "cpu":
        keep_freed_memory()
    bf16 = use_bf16(settings.precision, device)
    memory_format = memory_format_for(device)
    net.to(device, memory_format=memory_format).train()
    try:
        with BatchGradient(net, batch_parts(device), bf16, device, settings.seed) as gradient:
            result = _train_epochs(net, images, labels, settings, on_batch, on_metrics, device, gradient,
                                   memory_format)
    finally:
        net.to(memory_format=torch.contiguous_format)
    check_finite_weights(net, result.batches)
    return result


_DIVERGED_ADVICE = "lower learning_rate or choose another optimizer"


def check_finite_loss(loss_sum: float, seen: int, batches: int) -> None:
    """Raise :class:`TrainingDiverged` unless a window's loss sum is finite (called where it is synced)."""
    if not math.isfinite(loss_sum):
        raise TrainingDiverged(f"training diverged (loss {loss_sum / max(seen, 1)} at batch {batches}); "
                               + _DIVERGED_ADVICE)


def check_finite_weights(net: nn.Module, batches: int) -> None:
    """Raise :class:`TrainingDiverged` if any weight is NaN or infinite (one reduction, one sync)."""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all()
    if not bool(finite):
        raise TrainingDiverged(f"training diverged (weights not finite after batch {batches}); " + _DIVERGED_ADVICE)


def _train_epochs(
    net: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    settings: TrainSettings,
    on_batch: Callable[[], None] | None,
    on_metrics: Callable[[Metrics], None] | None,
    device: torch.device,
    gradient: BatchGradient,
    memory_format: torch.memory_format,
) -> TrainResult:
    """The loop of :func:`train`: parameters and optimizer state stay float32; bf16 is compute only."""
    optimizer = make_optimizer(settings.optimizer, net.parameters(), settings.learning_rate)
    generator = torch.Generator()
    if settings.seed is not None:
        generator.manual_seed(settings.seed)
    else:
        generator.seed()
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    y_all = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    n = len(y_all)
    batches = 0
    loss_sum, correct, seen = 0.0, 0, 0
    for _epoch in range(settings.epochs):
        order = torch.randperm(n, generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        # The window's sums stay tensors until they are reported: no device sync per batch.
        window_loss = torch.zeros((), dtype=torch.float64, device=device)
        window_correct = torch.zeros((), dtype=torch.int64, device=device)
        window_seen = 0
        for start in range(0, n, settings.batch_size):
            if on_batch is not None:
                on_batch()
            index = order[start : start + settings.batch_size]
            x = to_input(x_all[index], device, memory_format)
            y = y_all[index].to(device, non_blocking=True)
            batch_loss, batch_correct = train_step(gradient, optimizer, x, y)
            batches += 1
            window_loss += batch_loss.double()
            window_correct += batch_correct
            window_seen += len(y)
            if batches % LOG_EVERY_BATCHES == 0 or start + settings.batch_size >= n:
                total_loss, total_correct = window_loss.item(), int(window_correct.item())
                check_finite_loss(total_loss, window_seen, batches)  # where the window syncs anyway
                loss_sum, correct, seen = loss_sum + total_loss, correct + total_correct, seen + window_seen
                if on_metrics is not None and batches % LOG_EVERY_BATCHES == 0:
                    on_metrics({"training_loss": total_loss / window_seen,
                                "training_accuracy": total_correct / window_seen})
                window_loss.zero_()
                window_correct.zero_()
                window_seen = 0
        if on_metrics is not None:
            on_metrics({"training_loss": loss_sum / seen, "training_accuracy": correct / seen})
    return TrainResult(n, settings.epochs, loss_sum / max(seen, 1), correct / max(seen, 1), batches,
                       "bf16" if gradient.bf16 else "fp32")


def train_step(gradient: BatchGradient, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One update: the gradient of the whole batch (``x`` from :func:`to_input`), then one step.

    Returns the batch's summed loss and its count of correct predictions, as tensors.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum, correct = gradient(x, y)
    optimizer.step()
    return loss_sum, correct


@torch.no_grad()
def _outputs(net: nn.Module, images: np.ndarray, device: torch.device, on_batch: Callable[[], None] | None):
    net.to(device).eval()
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    for start in range(0, len(x_all), EVAL_BATCH):
        if on_batch is not None:
            on_batch()
        yield start, net(to_input(x_all[start : start + EVAL_BATCH], device)).float()


def evaluate(
    net: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device | None = None,
    on_batch: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """Mean negative log-likelihood and accuracy of ``net`` on labelled images."""
    device = device or select_device()
    y_all = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    loss_sum, correct = 0.0, 0
    for start, output in _outputs(net, images, device, on_batch):
        y = y_all[start : start + len(output)].to(device)
        loss_sum += F.nll_loss(output, y, reduction="sum").item()
        correct += int((output.argmax(1) == y).sum())
    n = max(len(y_all), 1)
    return loss_sum / n, correct / n


def predict(
    net: nn.Module,
    images: np.ndarray,
    device: torch.device | None = None,
    on_batch: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted digit and its probability for every image."""
    device = device or select_device()
    predicted, confidence = [], []
    for _start, output in _outputs(net, images, device, on_batch):
        best = output.max(1)
        predicted.append(best.indices.cpu().numpy())
        confidence.append(best.values.exp().cpu().numpy())
    if not predicted:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    return np.concatenate(predicted), np.concatenate(confidence)

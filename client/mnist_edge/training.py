"""Train, evaluate and predict: plain torch on uint8 image arrays, no scaleout import.

The loop is pytorch/examples' ``train()``: for every batch :func:`train_step` does forward, loss,
backward and the optimizer step. The edge callbacks, the local simulation and the standalone
commands all call these functions, so the learning code exists once. Hooks (``on_batch``,
``on_metrics``) let the caller check for task abort and report progress.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .hardware import memory_format_for, select_device, use_bf16
from .settings import TrainSettings

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
LOG_EVERY_BATCHES = 50
EVAL_BATCH = 1000

Metrics = dict[str, float]
Hook = Callable[[], None] | None
MetricsHook = Callable[[Metrics], None] | None


class TrainingDiverged(UserError, ArithmeticError):
    """The loss or the weights stopped being finite: nothing of this run may leave the node."""


@dataclass(frozen=True)
class TrainResult:
    """What one local training run did; loss and accuracy are over its last epoch."""

    num_examples: int
    training_loss: float
    training_accuracy: float
    batches: int
    precision: str  # what the compute used: "bf16" or "fp32" (``auto`` resolved)


def to_input(images_u8: torch.Tensor, device: torch.device,
             memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 (B, 28, 28) -> normalised float32 (B, 1, 28, 28) on ``device``."""
    x = images_u8.to(device, non_blocking=True).unsqueeze(1).float()
    x = x.mul_(1.0 / (255.0 * MNIST_STD)).sub_(MNIST_MEAN / MNIST_STD)
    return x.contiguous(memory_format=memory_format)


def make_optimizer(name: str, params, learning_rate: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=learning_rate)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}")


def seeded_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator fixed by ``seed`` (reproducible shuffling and dropout), or freshly seeded."""
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def dropout_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """Dropout's own stream when the round is seeded (distinct from the shuffling's); else torch's."""
    if seed is None:
        return None
    state = np.random.SeedSequence([seed % 2**64, 0]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


def train(net: nn.Module, images: np.ndarray, labels: np.ndarray, settings: TrainSettings,
          on_batch: Hook = None, on_metrics: MetricsHook = None, device: torch.device | None = None) -> TrainResult:
    """Train ``net`` in place for ``settings.epochs`` epochs, reshuffling every epoch.

    ``on_batch`` runs before every batch (an abort check raises from there, so training stops at
    once); ``on_metrics`` gets the running ``training_loss``/``training_accuracy`` every
    :data:`LOG_EVERY_BATCHES` batches and at the end of every epoch. Parameters and optimizer state
    stay float32; bf16 (where ``precision`` resolves to it) is compute only.
    """
    device = device or select_device()
    bf16 = use_bf16(settings.precision, device)
    memory_format = memory_format_for(device)
    optimizer = make_optimizer(settings.optimizer, net.parameters(), settings.learning_rate)
    generator = seeded_generator(settings.seed)
    dropout = dropout_generator(settings.seed, device)
    window = MetricWindow(on_metrics, device)
    net.to(device, memory_format=memory_format).train()
    try:
        for _epoch in range(settings.epochs):
            for x, y in batches(images, labels, settings.batch_size, generator, device, memory_format):
                if on_batch is not None:
                    on_batch()
                loss_sum, correct = train_step(net, optimizer, x, y, bf16, dropout)
                window.add(loss_sum, correct, len(y))
            window.end_epoch()
    finally:
        net.to(memory_format=torch.contiguous_format)
    check_finite_weights(net, window.batches)
    return TrainResult(len(labels), *window.last_epoch(), window.batches, "bf16" if bf16 else "fp32")


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               bf16: bool = False, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One update: forward, loss, backward, optimizer step. Returns the batch's summed loss and its
    count of correct predictions, as tensors (no device sync). ``generator`` draws the dropout masks."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        output = net(x, generator)
    loss = F.nll_loss(output.float(), y)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        return loss.detach() * len(y), (output.argmax(1) == y).sum()


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, generator: torch.Generator,
            device: torch.device, memory_format: torch.memory_format) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled batches, as inputs on ``device`` (normalised per batch) and targets."""
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    y_all = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    order = torch.randperm(len(y_all), generator=generator)
    for start in range(0, len(y_all), batch_size):
        index = order[start : start + batch_size]
        yield to_input(x_all[index], device, memory_format), y_all[index].to(device, non_blocking=True)


class MetricWindow:
    """Running loss and accuracy, reported every :data:`LOG_EVERY_BATCHES` batches and per epoch.

    The sums stay tensors until a report, so a batch costs no device sync; at every report the
    loss is checked to be finite (:class:`TrainingDiverged`), where the sync happens anyway.
    """

    def __init__(self, on_metrics: MetricsHook, device: torch.device | str = "cpu") -> None:
        self.on_metrics, self.batches = on_metrics, 0
        self._loss = torch.zeros((), dtype=torch.float64, device=device)
        self._correct = torch.zeros((), dtype=torch.int64, device=device)
        self._seen = 0
        self._epoch = [0.0, 0, 0]  # loss sum, correct, seen: this epoch's synced windows
        self._last = (math.nan, math.nan)

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor | int, seen: int) -> None:
        """One batch: its summed loss, its count of correct predictions and its size."""
        self.batches += 1
        self._loss += loss_sum.double()
        self._correct += correct
        self._seen += seen
        if self.batches % LOG_EVERY_BATCHES == 0:
            loss, right, seen_now = self._sync()
            if self.on_metrics is not None and seen_now:
                self.on_metrics({"training_loss": loss / seen_now, "training_accuracy": right / seen_now})

    def _sync(self) -> tuple[float, int, int]:
        loss, right, seen = self._loss.item(), int(self._correct.item()), self._seen
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training diverged (loss {loss / max(seen, 1)} at batch {self.batches}); "
                                   + _DIVERGED_ADVICE)
        self._loss.zero_()
        self._correct.zero_()
        self._seen = 0
        self._epoch = [self._epoch[0] + loss, self._epoch[1] + right, self._epoch[2] + seen]
        return loss, right, seen

    def end_epoch(self) -> None:
        self._sync()
        loss, right, seen = self._epoch
        self._epoch = [0.0, 0, 0]
        self._last = (loss / seen, right / seen) if seen else (math.nan, math.nan)
        if self.on_metrics is not None and seen:
            self.on_metrics({"training_loss": self._last[0], "training_accuracy": self._last[1]})

    def last_epoch(self) -> tuple[float, float]:
        """(loss, accuracy) over the last finished epoch."""
        return self._last


_DIVERGED_ADVICE = "lower learning_rate or choose another optimizer"


def check_finite_weights(net: nn.Module, batches: int) -> None:
    """Raise :class:`TrainingDiverged` if any weight is NaN or infinite (one reduction, one sync)."""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(p).all() for p in net.parameters()]).all()
    if not bool(finite):
        raise TrainingDiverged(f"training diverged (weights not finite after batch {batches}); " + _DIVERGED_ADVICE)


@torch.no_grad()
def _outputs(net: nn.Module, images: np.ndarray, device: torch.device, on_batch: Hook):
    net.to(device).eval()
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    for start in range(0, len(x_all), EVAL_BATCH):
        if on_batch is not None:
            on_batch()
        yield start, net(to_input(x_all[start : start + EVAL_BATCH], device)).float()


def evaluate(net: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device | None = None,
             on_batch: Hook = None) -> tuple[float, float]:
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


def predict(net: nn.Module, images: np.ndarray, device: torch.device | None = None,
            on_batch: Hook = None) -> tuple[np.ndarray, np.ndarray]:
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

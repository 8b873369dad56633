"""Train, evaluate and predict loops: plain torch on uint8 image arrays, no scaleout import.

The edge callbacks, the local simulation and the standalone commands all call these, so
the learning code exists once. Hooks (``on_batch``, ``on_metrics``) let the caller check for
task abort and report progress without this module knowing who is listening.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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


def select_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# CPU features that compute bfloat16 dot products in hardware (x86 AMX / AVX512-BF16, Arm BF16).
# oneDNN also "supports" bf16 on plain AVX-512 by emulation, which is typically slower than float32.
NATIVE_BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")


def _cpu_features() -> dict:
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # recent torch
    if capabilities is not None:
        return dict(capabilities())
    features = {}  # older torch: x86 checks only (every AMX part has AMX-BF16)
    for name, check in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
        function = getattr(torch.cpu, check, None)
        features[name] = bool(function and function())
    return features


def bf16_supported(device: torch.device) -> bool:
    """True only where the hardware computes bfloat16 natively (checked, not guessed).

    CPU: oneDNN's bf16 kernels must be usable *and* the CPU must have a native bf16 unit;
    CUDA: compute capability 8.0+ (Ampere), not the emulation older GPUs offer.
    """
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4: the check had no emulation path
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        features = _cpu_features()
        return any(features.get(name, False) for name in NATIVE_BF16_CPU_FEATURES)
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve the ``precision`` setting: ``auto`` means bf16 where native, fp32 elsewhere."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return bf16_supported(device)


def to_input(
    images_u8: torch.Tensor,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 (B, 28, 28) -> normalised float32 (B, 1, 28, 28) on ``device``."""
    x = images_u8.to(device, non_blocking=True).unsqueeze(1).float()
    x = x.mul_(1.0 / (255.0 * MNIST_STD)).sub_(MNIST_MEAN / MNIST_STD)
    return x.contiguous(memory_format=memory_format)


def memory_format_for(device: torch.device) -> torch.memory_format:
    """channels_last where it was measured to help: training on the CPU (oneDNN), fp32 and bf16.

    With NCHW tensors oneDNN reorders around every convolution, and the max-pool is the slow
    kind: per fp32 batch of 64 on one Zen 4 core the max-pool took ~6.4 ms instead of ~1.1 and
    the convolutions ~7 % longer; on the Xeon channels_last made a bf16 step ~1.25x faster.
    """
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
ALLOCATOR_MMAP_THRESHOLD = 32 << 20
ALLOCATOR_TRIM_THRESHOLD = 256 << 20


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc keep freed training buffers instead of returning them to the system (once per process).

    A CPU training step allocates and frees tens of MB (activations, gradients, bf16 copies);
    with glibc's defaults many of those blocks are ``mmap``-ed, unmapped and faulted back in every
    step. Serving blocks up to 32 MB from the heap and keeping up to 256 MB of free heap made a
    bf16 step ~25 % faster on the reference machine (median ~53 -> ~40 ms, see README
    Performance); the process keeps its peak memory. glibc only; skipped where the user chose
    (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set). Returns whether it applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mmap = mallopt(_M_MMAP_THRESHOLD, ALLOCATOR_MMAP_THRESHOLD)
    trim = mallopt(_M_TRIM_THRESHOLD, ALLOCATOR_TRIM_THRESHOLD)
    return bool(mmap and trim)


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

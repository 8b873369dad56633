"""The "Basic MNIST Example" CNN itself: its layers, its forward pass, its dropout.

The same function as pytorch/examples' ``Net``, computed in a cheaper order (README
"Performance"); ``model`` converts it to and from the federation's parameter lists and files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same scaling), drawing its mask with :func:`dropout`."""

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return dropout(x, self.p, generator) if self.training and self.p > 0 else x


class Net(nn.Module):
    """pytorch/examples mnist/main.py ``Net``: 2 conv, max-pool, 2 dropout, 2 linear.

    The same function as the example's, computed in a cheaper order: ReLU after the max-pool
    instead of before (``max(relu(a), relu(b)) == relu(max(a, b))``, gradients included, so the
    outputs and gradients are bit-identical) works on a quarter of the elements. ``generator``
    draws the dropout masks (default: torch's global generator), so concurrent parts of one
    batch can each draw their own reproducibly (see ``training``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = Dropout(0.25)
        self.dropout2 = Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = self.dropout1(x, generator)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x, generator)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def dropout(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout as ``F.dropout(x, p, training=True)``: zero with probability ``p``, scale by ``1/(1-p)``.

    The mask compares one random byte per element with ``256 p`` (so ``p`` must be a multiple of
    1/256, as 0.25 and 0.5 are: the keep probability is then exact), eight bytes per 64-bit
    draw; torch's ``bernoulli_`` draws and compares a float per element, several times slower
    for ``dropout1``'s 590k-element mask per batch.
    """
    threshold = p * 256
    if threshold != int(threshold):
        raise ValueError(f"dropout p must be a multiple of 1/256, got {p}")
    keep = random_bytes_like(x, generator) >= int(threshold)
    return x.mul(keep).mul_(1.0 / (1.0 - p))


def random_bytes_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random uint8 in ``x``'s shape and memory layout (NCHW or channels_last)."""
    count = x.numel()
    draws = torch.empty((count + 7) // 8, dtype=torch.int64, device=x.device)
    flat = draws.random_(-(2**63), None, generator=generator).view(torch.uint8)[:count]  # full 64-bit range
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = x.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(x.shape)

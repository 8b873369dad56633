"""The real MNIST images the tests use, read once per process.

A plain module (imported, not collected): pytest re-imports ``conftest.py`` for every session,
and `make mutate` runs one pytest session per mutant in a single warm process, so a cache in
conftest would re-read the images (~3 s of text parsing) for every mutant.
"""

from __future__ import annotations

import functools

import numpy as np

from mnist_edge.prepare import load_mnist5k


@functools.cache
def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28), labels int64) — 500 real MNIST images per digit."""
    return load_mnist5k()

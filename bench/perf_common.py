"""Helpers shared by the performance benchmarks: the machine, the images, medians, reporting.

The benchmarks run on shared, noisy machines, so every comparison alternates its contenders in
one process and reports medians; this module keeps that bookkeeping out of the scripts.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mnist_edge import training
from mnist_edge.prepare import load_mnist5k

_log = logging.getLogger("mnist_edge")  # per-round INFO lines would drown the report: a handler
_log.addHandler(logging.NullHandler())  # here keeps edge.configure_logging from adding its own
_log.setLevel(logging.WARNING)
RESULTS = Path(__file__).resolve().parent / "results"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine() -> str:
    """CPU model, the flags that decide bf16, cores, torch and Python versions, one line each."""
    model, flags = platform.processor() or "?", set()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.SubprocessError):
        pass
    cpu = torch.device("cpu")
    return "\n".join([
        f"cpu: {model}; flags: {' '.join(f for f in CPU_FLAGS if f in flags) or 'none of ' + ','.join(CPU_FLAGS)}",
        f"cores: {os.cpu_count()}; python {sys.version.split()[0]}; "
        f"torch {torch.__version__}; numpy {np.__version__}",
        f"native bf16 on this CPU (training.bf16_supported): {training.bf16_supported(cpu)}",
    ])


def images(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` real MNIST images in a fixed shuffled order (the 5k subset, repeated if needed)."""
    pixels, labels = load_mnist5k()
    order = np.random.default_rng(seed).permutation(len(labels))
    order = np.resize(order, count)
    return pixels[order], labels[order]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


class Report:
    """Prints as it goes (so a killed run still shows its rounds) and can be written to results/."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self, path: Path | None) -> None:
        if path is not None:
            path.write_text("\n".join(self.lines) + "\n")

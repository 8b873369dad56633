"""Helpers shared by the performance benchmarks: the machine, the images, medians, reporting.

The benchmarks run on shared, noisy machines, so every comparison alternates its contenders in
one process and reports medians; this module keeps that bookkeeping out of the scripts.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mnist_edge import hardware
from mnist_edge.prepare import load_mnist5k

_log = logging.getLogger("mnist_edge")  # per-round INFO lines would drown the report: a handler
_log.addHandler(logging.NullHandler())  # here keeps edge.configure_logging from adding its own
_log.setLevel(logging.WARNING)
RESULTS = Path(__file__).resolve().parent / "results"
# lscpu flags that decide the precision and the kernels: x86 (AVX2, AVX-512, bf16, AMX) and Arm.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "bf16", "sve", "svebf16")
TORCH_CAPABILITIES = ("avx2", "avx512_f", "avx512_bf16", "amx_bf16", "amx_tile")


@functools.cache
def lscpu() -> tuple[str, frozenset[str]]:
    """(CPU model name, its flags) as lscpu reports them; (platform.processor(), {}) without lscpu."""
    model, flags = platform.processor() or "?", frozenset()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return model, flags
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            model = value.strip()
        elif key.strip() == "Flags":
            flags = frozenset(value.split())
    return model, flags


def cpu_tag() -> str:
    """One line naming the CPU and its deciding flags: printed with every result."""
    model, flags = lscpu()
    shown = " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + ",".join(CPU_FLAGS)
    return f"{model} [{shown}]"


def cpu_class() -> str:
    """The results folder for this CPU: architecture and its best native bf16 unit, if any.

    ``x86_64-amx`` (AMX), ``x86_64-avx512_bf16`` (AVX512-BF16, no AMX), ``x86_64-fp32`` (no
    native bf16: AVX2 or plain AVX-512), ``aarch64-bf16``, ``aarch64-fp32``.
    """
    arch, (_model, flags) = platform.machine(), lscpu()
    for flag, name in (("amx_bf16", "amx"), ("avx512_bf16", "avx512_bf16"), ("bf16", "bf16"), ("svebf16", "bf16")):
        if flag in flags:
            return f"{arch}-{name}"
    return f"{arch}-fp32"


def load() -> str:
    """The 1-minute load average, to read a timing against (others' work on a shared machine)."""
    return f"load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load ?"


def machine() -> str:
    """CPU model, its flags (lscpu and torch.cpu), cores, versions, native bf16; one line each."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    torch_flags = " ".join(f for f in TORCH_CAPABILITIES if capabilities.get(f)) or "n/a"
    cpu = torch.device("cpu")
    return "\n".join([
        f"cpu: {cpu_tag()}; results class {cpu_class()}",
        f"torch.cpu capabilities: {torch_flags}",
        f"cores: {os.cpu_count()}; python {sys.version.split()[0]}; "
        f"torch {torch.__version__}; numpy {np.__version__}; scaleout {_version('scaleout')}",
        f"native bf16 on this CPU (hardware.bf16_supported): {hardware.bf16_supported(cpu)}",
    ])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


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
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(self.lines) + "\n")


if __name__ == "__main__":  # `python bench/perf_common.py`: this CPU's results folder (for make bench)
    print(os.path.relpath(RESULTS / cpu_class()))

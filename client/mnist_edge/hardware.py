"""What this node computes on: the device, native bf16, the memory layout, the allocator.

Each choice here is made from what the hardware reports and what was measured on it (README
"Performance"), never from a round's settings, so the training loops stay free of it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Mapping

import torch


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


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_process(threads: int | None, environ: Mapping[str, str]) -> None:
    """Set up this process for training, once, from the entry point: threads and the allocator."""
    if threads is not None:
        torch.set_num_threads(threads)
    if select_device().type == "cpu":
        keep_freed_memory(any(name in environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")))


@functools.cache
def keep_freed_memory(user_chose: bool = False) -> bool:
    """Let glibc keep freed training buffers instead of returning them to the system (once per process).

    A CPU training step allocates and frees tens of MB (activations, gradients, bf16 copies);
    with glibc's defaults many of those blocks are ``mmap``-ed, unmapped and faulted back in every
    step. Serving blocks up to 32 MB from the heap and keeping up to 256 MB of free heap made a
    bf16 step ~25 % faster on the reference machine (median ~53 -> ~40 ms, see bench/README.rst);
    the process keeps its peak memory. glibc only; skipped where the user chose
    (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set). Returns whether it applied.
    """
    if user_chose or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
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

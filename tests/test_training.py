"""The precision setting: bf16 only where the hardware has it; weights and updates stay float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mnist_edge import model, training
from mnist_edge.settings import parse_settings

CPU = torch.device("cpu")


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    pytest.skip("/proc/cpuinfo lists no CPU flags")


def test_auto_matches_this_cpus_own_flags():
    native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16", "svebf16"})
    assert training.bf16_supported(CPU) == (native and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert training.use_bf16("auto", CPU) == training.bf16_supported(CPU)
    assert training.use_bf16("fp32", CPU) is False and training.use_bf16("bf16", CPU) is True


def test_a_cpu_without_a_native_bf16_unit_gets_fp32(monkeypatch):
    """Plain AVX-512 passes oneDNN's check but only emulates bf16: auto must say fp32 there."""
    monkeypatch.setattr(training, "_cpu_features", lambda: {"avx512f": True, "avx512_bf16": False})
    assert training.bf16_supported(CPU) is False
    assert training.use_bf16("auto", CPU) is False


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_parameters_and_update_stay_float32_in_the_usual_layout(mnist5k, precision):
    images, labels = mnist5k
    net = model.new_model(0)
    result = training.train(net, images[:256], labels[:256], parse_settings({"precision": precision, "seed": 0}))
    assert result.num_examples == 256 and np.isfinite(result.training_loss)
    for name, tensor in net.state_dict().items():
        assert tensor.dtype == torch.float32, name
        assert tensor.is_contiguous(), f"{name} left in channels_last"
    params = model.get_parameters(net)
    assert all(p.dtype == np.float32 for p in params)
    model.check_parameters(params)

"""The precision setting: bf16 only where the hardware has it; weights and updates stay float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import auto_precision_here

from mnist_edge import model, training
from mnist_edge.settings import parse_settings

CPU = torch.device("cpu")


def test_auto_matches_this_cpus_own_flags():
    assert training.use_bf16("auto", CPU) == (auto_precision_here() == "bf16")
    assert training.use_bf16("fp32", CPU) is False and training.use_bf16("bf16", CPU) is True


@pytest.fixture
def cpu_like(monkeypatch):
    """Make this CPU look like another: oneDNN's bf16 kernels usable or not, and its feature flags.

    Both are replaced, so the flags are read on every CPU (on one without oneDNN bf16 the real
    check would return before looking at them).
    """

    def pretend(onednn_bf16: bool, **features: bool) -> None:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
        monkeypatch.setattr(training, "_cpu_features", lambda: dict(features))

    return pretend


@pytest.mark.parametrize("onednn_bf16, features, native", [
    (True, {"avx512_f": True, "avx512_bf16": False}, False),  # plain AVX-512: oneDNN emulates bf16
    (True, {"avx512_f": True, "avx512_bf16": True}, True),
    (True, {"amx_bf16": True}, True),
    (True, {"bf16": True}, True),  # Arm
    (True, {"sve_bf16": True}, True),
    (True, {}, False),
    (False, {"avx512_bf16": True, "amx_bf16": True}, False),  # no usable bf16 kernels in this torch
])
def test_auto_is_bf16_only_on_a_native_bf16_unit_with_onednn_kernels(cpu_like, onednn_bf16, features, native):
    """Mutations: ignore the CPU features (oneDNN's answer alone), or ignore oneDNN's answer;
    either way one of these CPUs gets the wrong precision."""
    cpu_like(onednn_bf16, **features)
    assert training.bf16_supported(CPU) is native
    assert training.use_bf16("auto", CPU) is native
    assert training.use_bf16("fp32", CPU) is False and training.use_bf16("bf16", CPU) is True


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

"""The precision setting: bf16 only where the hardware has it; weights and updates stay float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import auto_precision_here
from mnist_edge import hardware, model, training
from mnist_edge.settings import parse_settings

CPU = torch.device("cpu")


def test_auto_matches_this_cpus_own_flags():
    assert hardware.use_bf16("auto", CPU) == (auto_precision_here() == "bf16")
    assert hardware.use_bf16("fp32", CPU) is False and hardware.use_bf16("bf16", CPU) is True


@pytest.fixture
def cpu_like(monkeypatch):
    """Make this CPU look like another: oneDNN's bf16 kernels usable or not, and its feature flags.

    A CPU one does not have can only be described, so torch's own answers are replaced: its feature
    list (``torch.cpu.get_capabilities``) and oneDNN's bf16 check (``_is_mkldnn_bf16_supported``, torch
    has no public name for it). Both are replaced, so the flags are read on every CPU (on one without
    oneDNN bf16 the real check would return before looking at them).
    """

    def pretend(onednn_bf16: bool, **features: bool) -> None:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", **features},
                            raising=False)

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
    """``auto`` is bf16 only where both hold: oneDNN has bf16 kernels and the CPU has a native bf16 unit
    (AMX, AVX512-BF16, Arm BF16 or SVE-BF16); plain AVX-512 emulates bf16, slower than fp32."""
    cpu_like(onednn_bf16, **features)
    assert hardware.bf16_supported(CPU) is native
    assert hardware.use_bf16("auto", CPU) is native
    assert hardware.use_bf16("fp32", CPU) is False and hardware.use_bf16("bf16", CPU) is True


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


@pytest.fixture(scope="module")
def trained_net(mnist5k) -> torch.nn.Module:
    """A CNN after eight steps on 256 real images: many of its predictions are right, not all."""
    images, labels = mnist5k
    pick = np.random.default_rng(0).permutation(len(labels))[:256]  # the images come sorted by digit
    net = model.new_model(0)
    training.train(net, images[pick], labels[pick], parse_settings({"precision": "fp32", "seed": 0, "batch_size": 32}))
    return net


def reference_outputs(net: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    """Log-probabilities computed here in one batch, normalised as docs/data-format.rst says."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    with torch.no_grad():
        return net.eval()((x - training.MNIST_MEAN) / training.MNIST_STD).double()


def test_evaluate_and_predict_agree_with_a_single_batch_reference(trained_net, mnist5k):
    """The mean loss and the accuracy over every image, each image's most likely digit and its probability,
    equal to one batch computed here; 1,100 images take two batches (1000 and 100), each checked for abort
    before it runs."""
    images, labels = mnist5k
    pick = np.random.default_rng(1).permutation(len(labels))[:1100]
    images, labels = images[pick], labels[pick]
    reference = reference_outputs(trained_net, images)
    checks = []
    loss, accuracy = training.evaluate(trained_net, images, labels, CPU, on_batch=lambda: checks.append(1))
    expected_accuracy = (reference.argmax(1).numpy() == labels).mean()
    assert 0.3 < accuracy < 1 and accuracy == pytest.approx(expected_accuracy, abs=1 / 1100)
    assert loss == pytest.approx(-reference[torch.arange(1100), labels].mean().item(), rel=1e-4)
    predicted, confidence = training.predict(trained_net, images, CPU, on_batch=lambda: checks.append(2))
    assert checks == [1, 1, 2, 2]
    assert predicted.dtype == np.int64 and confidence.dtype == np.float32 and len(predicted) == 1100
    assert (predicted == reference.argmax(1).numpy()).mean() > 0.99  # float rounding may flip a near tie
    np.testing.assert_allclose(confidence, reference.max(1).values.exp().numpy(), rtol=1e-4)


def test_predict_on_no_images_is_empty(trained_net):
    predicted, confidence = training.predict(trained_net, np.zeros((0, 28, 28), np.uint8), CPU)
    assert predicted.shape == confidence.shape == (0,)
    assert predicted.dtype == np.int64 and confidence.dtype == np.float32
    assert training.evaluate(trained_net, np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), CPU) == (0.0, 0.0)


META = torch.device("meta")


@pytest.mark.parametrize("run, error, message", [
    (lambda net, images, labels: training.evaluate(net, images, labels, META),
     RuntimeError, "Tensor.item() cannot be called on meta tensors"),
    (lambda net, images, labels: training.predict(net, images, META),
     NotImplementedError, "Cannot copy out of meta tensor; no data!"),
], ids=["evaluate", "predict"])
def test_evaluate_and_predict_compute_on_the_device_they_are_given(mnist5k, run, error, message):
    """The meta device stands in for a GPU on a CPU-only machine: the net, the images and the labels
    all go there, and only reading a number back fails (a meta tensor holds no data): nothing is computed
    on the CPU behind the caller's back, and the loss never meets tensors on two devices.
    """
    images, labels = mnist5k
    net = model.new_model(0)
    inputs = []
    net.register_forward_pre_hook(lambda module, args: inputs.append(args[0].device))
    with pytest.raises(error) as raised:
        run(net, images[:3], labels[:3])
    assert str(raised.value) == message
    assert inputs == [META] and {p.device for p in net.parameters()} == {META}


@pytest.mark.parametrize("dtype", [np.int32, np.int16, np.uint8])
def test_evaluate_takes_labels_of_any_integer_type(trained_net, mnist5k, dtype):
    """Labels of any integer type give the same loss and accuracy (numpy's default integer is int32 on
    Windows; torch's loss takes int64 targets only)."""
    images, labels = mnist5k
    pick = np.random.default_rng(3).permutation(len(labels))[:50]
    expected = training.evaluate(trained_net, images[pick], labels[pick], CPU)
    assert training.evaluate(trained_net, images[pick], labels[pick].astype(dtype), CPU) == expected


def test_the_loss_and_accuracy_of_one_image_are_that_images_own(trained_net, mnist5k):
    """Evaluated alone, one image's loss and accuracy are its own (not halved, not averaged with nothing)."""
    images, labels = mnist5k
    pick = np.random.default_rng(4).permutation(len(labels))[:20]
    reference = reference_outputs(trained_net, images[pick])
    right = int(np.flatnonzero(reference.argmax(1).numpy() == labels[pick])[0])  # one the net gets right
    one = pick[right : right + 1]
    loss, accuracy = training.evaluate(trained_net, images[one], labels[one], CPU)
    assert accuracy == 1.0
    assert loss == pytest.approx(-reference[right, labels[one[0]]].item(), rel=1e-4)

"""The training loop's contract, seen from outside through torch's own module hooks.

What the callbacks, the federation and the privacy ledger rely on: every image once per epoch in
batches of ``batch_size`` (reshuffled each epoch), a hook before every batch, metrics every 50
batches and at each epoch's end, the precision asked for, and divergence caught and named.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnist_edge import hardware, model, training
from mnist_edge.settings import parse_settings
from mnist_edge.training import TrainingDiverged

CPU = torch.device("cpu")
ADVICE = "lower learning_rate or choose another optimizer"


@pytest.fixture
def batches_seen(monkeypatch):
    """Every batch the CNN is asked to compute while training: (its size, its input's sum)."""
    seen: list[tuple[int, float]] = []

    def new_model(seed: int) -> torch.nn.Module:
        net = model.new_model(seed)
        net.register_forward_pre_hook(lambda module, args: seen.append((len(args[0]), float(args[0].sum()))))
        return net

    return new_model, seen


def test_every_image_once_per_epoch_in_batches_with_hooks_and_metrics(mnist5k, batches_seen):
    """100 images, batches of 2, 2 epochs: 50 batches an epoch, so each 50-batch window is an epoch
    and its metrics must equal the epoch's.

    Mutations: a batch loop that starts at 1 or counts to ``batch_size``, no reshuffle, a batch
    counter that starts at 1 or counts down, running sums that start at 1, hooks not passed on,
    the 50-batch window or the epoch line not logged: one of these assertions fails.
    """
    images, labels = mnist5k
    pick = np.random.default_rng(2).permutation(len(labels))[:100]
    new_model, seen = batches_seen
    checks, metrics = [], []
    result = training.train(new_model(0), images[pick], labels[pick].astype(np.uint8),  # any integer labels
                            parse_settings({"epochs": 2, "batch_size": 2, "seed": 4, "precision": "fp32"}),
                            on_batch=lambda: checks.append(len(seen)), on_metrics=metrics.append, device=CPU)
    assert [size for size, _ in seen] == [2] * 100
    assert checks == list(range(100))  # before every batch, and before its forward pass
    whole = float(training.to_input(torch.from_numpy(images[pick]), CPU).sum())
    epochs = [seen[:50], seen[50:]]
    assert [sum(total for _, total in epoch) for epoch in epochs] == pytest.approx([whole, whole], rel=1e-5)
    assert [total for _, total in epochs[0]] != [total for _, total in epochs[1]]  # reshuffled
    assert (result.num_examples, result.epochs, result.batches, result.precision) == (100, 2, 100, "fp32")
    assert len(metrics) == 4 and all(set(m) == {"training_loss", "training_accuracy"} for m in metrics)
    assert metrics[0] == metrics[1] and metrics[2] == metrics[3] and metrics[1] != metrics[3]
    for m in metrics:
        correct = m["training_accuracy"] * 100
        assert abs(correct - round(correct)) < 1e-6 and 0 < m["training_loss"] < 10
    assert (result.training_loss, result.training_accuracy) == (metrics[3]["training_loss"],
                                                                metrics[3]["training_accuracy"])


def test_a_partial_last_window_is_logged_only_with_its_epoch(mnist5k):
    """65 batches an epoch: a window line at batch 50, then the epoch's line over all 130 images."""
    images, labels = mnist5k
    metrics = []
    training.train(model.new_model(0), images[:130], labels[:130], parse_settings({"batch_size": 2, "seed": 1}),
                   on_metrics=metrics.append, device=CPU)
    assert len(metrics) == 2
    for m, count in zip(metrics, (100, 130)):
        assert abs(m["training_accuracy"] * count - round(m["training_accuracy"] * count)) < 1e-6


def test_a_batch_of_all_images_is_one_batch_an_epoch(mnist5k, batches_seen):
    images, labels = mnist5k
    new_model, seen = batches_seen
    metrics = []
    result = training.train(new_model(0), images[:10], labels[:10], parse_settings({"batch_size": 64, "epochs": 3}),
                            on_metrics=metrics.append, device=CPU)
    assert [size for size, _ in seen] == [10, 10, 10] and result.batches == 3 and len(metrics) == 3


@pytest.mark.parametrize("precision, compute", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_precision_asked_for_is_the_precision_computed(mnist5k, precision, compute):
    """Mutation: autocast enabled whatever ``bf16`` says, or the setting not read: fp32 computes in bf16."""
    images, labels = mnist5k
    net = model.new_model(0)
    dtypes = set()
    net.conv1.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    result = training.train(net, images[:8], labels[:8], parse_settings({"precision": precision, "batch_size": 8}),
                            device=CPU)
    assert dtypes == {compute} and result.precision == precision


def test_weights_that_overflow_in_the_last_step_are_caught_naming_the_batch(mnist5k):
    """One batch: its loss (computed before the step) is finite, the step sends the weights to inf."""
    images, labels = mnist5k
    pick = np.random.default_rng(0).permutation(len(labels))[:64]
    net = model.new_model(0)
    with torch.no_grad():
        net.fc2.weight.mul_(1e37)  # finite, but its gradients are not small
    settings = parse_settings({"optimizer": "sgd", "learning_rate": 1000, "batch_size": 1024, "seed": 1,
                               "precision": "fp32"})
    with pytest.raises(TrainingDiverged) as error:
        training.train(net, images[pick], labels[pick], settings, device=CPU)
    assert str(error.value) == f"training diverged (weights not finite after batch 1); {ADVICE}"


@pytest.mark.parametrize("loss_sum", [float("nan"), float("inf")])
def test_a_non_finite_loss_is_named_with_its_batch(loss_sum):
    training.check_finite_loss(12.5, 5, 3)
    with pytest.raises(TrainingDiverged) as error:
        training.check_finite_loss(loss_sum, 5, 3)
    assert str(error.value) == f"training diverged (loss {loss_sum} at batch 3); {ADVICE}"
    with pytest.raises(TrainingDiverged, match=r"^training diverged \(loss nan at batch 0\)"):
        training.check_finite_loss(float("nan"), 0, 0)


@pytest.mark.parametrize("name, kind, extra", [
    ("adadelta", torch.optim.Adadelta, {}), ("sgd", torch.optim.SGD, {"momentum": 0.9}), ("adam", torch.optim.Adam, {}),
])
def test_each_optimizer_gets_the_learning_rate(name, kind, extra):
    params = list(model.Net().parameters())
    optimizer = training.make_optimizer(name, params, 0.125)
    group = optimizer.param_groups[0]
    assert type(optimizer) is kind and group["lr"] == 0.125 and group["params"] == params
    assert {key: group[key] for key in extra} == extra
    with pytest.raises(ValueError, match="^unknown optimizer 'rmsprop'$"):
        training.make_optimizer("rmsprop", params, 0.125)


def test_images_are_normalised_with_the_mnist_mean_and_std():
    pixels = torch.tensor([[[0, 128, 255] + [0] * 25] * 28], dtype=torch.uint8)
    x = training.to_input(pixels, CPU)
    assert x.shape == (1, 1, 28, 28) and x.dtype == torch.float32
    expected = [(v / 255 - 0.1307) / 0.3081 for v in (0, 128, 255)]
    assert x[0, 0, 0, :3].tolist() == pytest.approx(expected, rel=1e-6)


def test_cuda_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware.select_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.select_device() == CPU


def test_a_gpu_counts_as_bf16_only_without_emulation(monkeypatch):
    """Pre-Ampere GPUs emulate bf16; torch < 2.4 had no ``including_emulation`` (TypeError)."""
    asked = []

    def native_only(including_emulation=True):
        asked.append(including_emulation)
        return not including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", native_only)
    assert hardware.bf16_supported(torch.device("cuda")) is True and asked == [False]

    def old_torch(**kwargs):
        if kwargs:
            raise TypeError("unexpected keyword argument 'including_emulation'")
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", old_torch)
    assert hardware.bf16_supported(torch.device("cuda")) is True
    assert hardware.bf16_supported(torch.device("meta")) is False


def test_cpu_features_come_from_torch_or_from_its_older_x86_checks(monkeypatch):
    """Recent torch lists the CPU's features; older torch has one check per feature (maybe absent)."""
    capabilities = {"avx512_bf16": True, "amx_bf16": False, "other": 3}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert hardware._cpu_features() == capabilities
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    for avx512, amx in ((True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512: value, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value, raising=False)
        assert hardware._cpu_features() == {"avx512_bf16": avx512, "amx_bf16": amx}
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert hardware._cpu_features() == {"avx512_bf16": False, "amx_bf16": False}

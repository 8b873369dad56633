"""The training loop's contract, seen from outside through torch's own module hooks.

What the callbacks, the federation and the privacy ledger rely on: every image once per epoch in
batches of ``batch_size`` (reshuffled each epoch), a hook before every batch, metrics every 50
batches and at each epoch's end, the precision asked for, and divergence caught and named.
"""

from __future__ import annotations

import os

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
    """100 images, batches of 2, 2 epochs: every image once per epoch, reshuffled, the abort hook
    before every batch, and metrics every 50 batches and per epoch (here the same windows, so equal)."""
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
    assert (result.num_examples, result.batches, result.precision) == (100, 100, "fp32")
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
    """``fp32`` computes in float32 and ``bf16`` in bfloat16, whatever the hardware."""
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_is_named_with_its_batch_at_the_next_report(bad):
    """The running sums are checked where they are reported: the epoch's end names the last batch,
    with the window's mean loss; finite windows report as usual."""
    reported = []
    window = training.MetricWindow(reported.append)
    window.add(torch.tensor(12.5), 4, 5)
    window.end_epoch()
    assert reported == [{"training_loss": 2.5, "training_accuracy": 0.8}] and window.last_epoch() == (2.5, 0.8)
    window.add(torch.tensor(1.0), 1, 2)
    window.add(torch.tensor(bad), 0, 3)
    with pytest.raises(TrainingDiverged) as error:
        window.end_epoch()
    assert str(error.value) == f"training diverged (loss {bad / 5} at batch 3); {ADVICE}"


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


def test_a_native_bf16_unit_is_found_by_recent_and_older_torch(monkeypatch):
    """Recent torch lists the CPU's features; older torch has one check per x86 feature, maybe absent (an
    absent check is no unit). Either way a CPU with AVX512-BF16 or AMX counts as native bf16, one with
    neither does not. These CPUs can only be described: torch's answers are replaced, oneDNN's bf16
    kernels said to be usable (``_is_mkldnn_bf16_supported``, torch has no public name for it)."""
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for listed, native in (({"avx512_bf16": True, "amx_bf16": False, "other": 3}, True),
                           ({"avx512_bf16": False, "amx_bf16": False, "other": 3}, False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda listed=listed: listed, raising=False)
        assert hardware.bf16_supported(CPU) is native
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    for avx512, amx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda value=avx512: value, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda value=amx: value, raising=False)
        assert hardware.bf16_supported(CPU) is (avx512 or amx)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert hardware.bf16_supported(CPU) is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert hardware.bf16_supported(CPU) is True


def test_the_same_seed_trains_the_same_weights_whatever_the_label_type(mnist5k):
    """A round's ``seed`` fixes the shuffle and the dropout masks: the same seed gives bit-identical
    weights (whatever integer type the labels have), another seed other weights."""
    images, labels = mnist5k
    pick = np.random.default_rng(6).permutation(len(labels))[:64]

    def weights(seed: int, label_type=np.int64) -> list[np.ndarray]:
        net = model.new_model(0)
        training.train(net, images[pick], labels[pick].astype(label_type),
                       parse_settings({"batch_size": 16, "seed": seed, "precision": "fp32"}), device=CPU)
        return model.get_parameters(net)

    first = weights(3)
    assert all(np.array_equal(a, b) for a, b in zip(first, weights(3, np.int32)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, weights(4)))


@pytest.mark.parametrize("count, batch_size", [(130, 2), (1, 1)])
def test_the_reported_loss_and_accuracy_are_those_of_the_batches(mnist5k, monkeypatch, count, batch_size):
    """The metrics and the result are the float64 sums of every batch's summed loss and correct
    count (as each step returned them) over the window or the epoch, divided by its images: the
    last partial window counts, and one image is one image."""
    images, labels = mnist5k
    pick = np.random.default_rng(5).permutation(len(labels))[:count]
    steps: list[tuple[float, int, int]] = []
    real_step = training.train_step

    def recording(net, optimizer, x, y, bf16, generator):
        loss_sum, correct = real_step(net, optimizer, x, y, bf16, generator)
        steps.append((float(loss_sum.double()), int(correct), len(y)))
        return loss_sum, correct

    net = model.new_model(0)
    if count == 1:  # a net taught "0" on 256 zeros gets a 0 right: its accuracy is 1, not 0 whatever the divisor
        assert set(labels[:301]) == {0}
        training.train(net, images[:256], labels[:256], parse_settings({"batch_size": 32, "seed": 0}), device=CPU)
        pick = np.array([300])
    monkeypatch.setattr(training, "train_step", recording)
    metrics = []
    result = training.train(net, images[pick], labels[pick],
                            parse_settings({"batch_size": batch_size, "seed": 2, "precision": "fp32"}),
                            on_metrics=metrics.append, device=CPU)
    windows = [steps[:50], steps[50:]] if len(steps) > 50 else [steps]
    sums = [(sum(loss for loss, _, _ in w), sum(c for _, c, _ in w), sum(n for _, _, n in w)) for w in windows]
    expected = [{"training_loss": loss / n, "training_accuracy": c / n} for loss, c, n in sums[:-1]]
    loss, correct = sum(s[0] for s in sums), sum(s[1] for s in sums)
    expected.append({"training_loss": loss / count, "training_accuracy": correct / count})
    assert [m.keys() for m in metrics] == [e.keys() for e in expected]
    for m, e in zip(metrics, expected):
        assert m["training_loss"] == pytest.approx(e["training_loss"], rel=1e-12)
        assert m["training_accuracy"] == e["training_accuracy"]
    assert (result.training_loss, result.training_accuracy) == (metrics[-1]["training_loss"],
                                                                metrics[-1]["training_accuracy"])
    assert count > 1 or steps[0][1] == 1


def test_a_loss_that_stops_being_finite_during_training_is_named_with_its_batch(mnist5k):
    """Batch 1 sends the weights to inf, so batch 2's loss is NaN: the window ending there names it."""
    images, labels = mnist5k
    pick = np.random.default_rng(0).permutation(len(labels))[:64]
    net = model.new_model(0)
    with torch.no_grad():
        net.fc2.weight.mul_(1e37)
    settings = parse_settings({"optimizer": "sgd", "learning_rate": 1000, "batch_size": 32, "seed": 1,
                               "precision": "fp32"})
    with pytest.raises(TrainingDiverged) as error:
        training.train(net, images[pick], labels[pick], settings, device=CPU)
    assert str(error.value) == f"training diverged (loss nan at batch 2); {ADVICE}"


def test_training_on_the_cpu_computes_in_channels_last_and_hands_back_a_plain_net(mnist5k):
    """On the CPU the convolutions run on channels_last weights (bench/README.rst "Training speed");
    the CNN comes back in the default layout. A GPU measured no gain from it."""
    images, labels = mnist5k
    layouts = []
    net = model.new_model(0)
    net.conv2.register_forward_pre_hook(  # conv1 has one input channel: both layouts are the same there
        lambda module, args: layouts.append(module.weight.is_contiguous(memory_format=torch.channels_last)))
    training.train(net, images[:8], labels[:8], parse_settings({"batch_size": 8, "precision": "fp32"}), device=CPU)
    assert layouts == [True] and net.conv2.weight.is_contiguous()
    assert hardware.memory_format_for(torch.device("cuda")) == torch.contiguous_format  # a device name, no GPU needed


@pytest.mark.parametrize("environ, user_chose", [
    ({}, False), ({"MALLOC_TRIM_THRESHOLD_": "131072"}, True), ({"MALLOC_MMAP_THRESHOLD_": "65536"}, True),
    ({"malloc_trim_threshold_": "1", "malloc_mmap_threshold_": "1", "MALLOC_ARENA_MAX": "2"}, False),
])
def test_the_process_keeps_freed_memory_unless_the_user_tuned_the_allocator(monkeypatch, environ, user_chose):
    """Set up once where a process starts: the thread count asked for, and glibc's thresholds unless
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (glibc's own names) says the user chose them.
    The allocator step itself is process-wide, so what it is told is recorded instead of applied."""
    told = []
    monkeypatch.setattr(hardware, "keep_freed_memory", lambda user_chose=False: told.append(user_chose))
    threads = torch.get_num_threads()
    try:
        hardware.configure_process(1, environ)
        assert torch.get_num_threads() == 1 and told == [user_chose]
    finally:
        torch.set_num_threads(threads)


def test_the_allocator_is_tuned_on_glibc_only_and_never_over_the_users_choice():
    hardware.keep_freed_memory.cache_clear()
    assert hardware.keep_freed_memory(True) is False
    assert hardware.keep_freed_memory(False) is (__import__("platform").libc_ver()[0] == "glibc")


def test_the_cores_are_the_affinity_masks_or_else_what_the_system_counts(monkeypatch):
    """A container's or taskset's limit where the system has affinity masks (Linux); elsewhere the system's
    count, or 1 when it does not know. Other systems are described by removing Linux's call."""
    assert hardware.cpu_count() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert hardware.cpu_count() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert hardware.cpu_count() == 1

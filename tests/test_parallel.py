"""A batch in parts on the cores: the same gradient as the whole batch, reproducible, threads restored."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnist_edge import model, parallel, training
from mnist_edge.settings import parse_settings

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def real_batch(mnist5k, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = mnist5k
    index = np.random.default_rng(0).choice(len(labels), size, replace=False)
    return training.to_input(torch.from_numpy(images[index]), CPU), torch.from_numpy(labels[index].astype(np.int64))


def whole_batch_gradient(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    net = model.new_model(0).eval()  # eval: no dropout, so parts and whole see the same function
    F.nll_loss(net(x), y).backward()
    return [p.grad for p in net.parameters()]


@pytest.mark.parametrize("parts,size", [(2, 64), (2, 7), (3, 64), (2, 1)])
def test_parts_sum_to_the_gradient_of_the_whole_batch(mnist5k, two_threads, parts, size):
    x, y = real_batch(mnist5k, size)
    expected = whole_batch_gradient(x, y)
    net = model.new_model(0).eval()
    with parallel.BatchGradient(net, parts, False, CPU, seed=0) as gradient:
        loss_sum, correct = gradient(x, y)
    for (name, p), want in zip(net.named_parameters(), expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=name)
    output = model.new_model(0).eval()(x)
    torch.testing.assert_close(loss_sum, F.nll_loss(output, y, reduction="sum"))
    assert int(correct) == int((output.argmax(1) == y).sum())


def test_two_parts_run_on_two_threads_and_the_thread_count_comes_back(mnist5k, two_threads):
    x, y = real_batch(mnist5k)
    seen: set[tuple[int, int]] = set()  # (thread id, torch threads there) for each part's forward

    def record(_module, _inputs):
        seen.add((threading.get_ident(), torch.get_num_threads()))

    net = model.new_model(0)
    net.conv1.register_forward_pre_hook(record)
    with parallel.BatchGradient(net, 2, False, CPU, seed=0) as gradient:
        gradient(x, y)
        assert torch.get_num_threads() == 2  # the optimizer step gets both threads
    assert len({ident for ident, _ in seen}) == 2 and {threads for _, threads in seen} == {1}
    assert torch.get_num_threads() == 2


def test_a_failing_part_raises_and_restores_the_threads(mnist5k, two_threads):
    x, y = real_batch(mnist5k)
    y[-1] = 10  # no such class: the second part's loss fails
    with parallel.BatchGradient(model.new_model(0), 2, False, CPU, seed=0) as gradient:
        with pytest.raises((IndexError, RuntimeError)):
            gradient(x, y)
    assert torch.get_num_threads() == 2


def test_batches_stay_whole_unless_the_node_asks_for_parts(monkeypatch):
    """Mutation: a default of 2 parts (measured slower on a quiet machine) fails here."""
    monkeypatch.delenv(parallel.PARTS_ENV, raising=False)
    assert parallel.batch_parts(CPU) == 1
    assert parallel.batch_parts(torch.device("cuda")) == 1


def test_training_in_parts_is_reproducible_from_the_seed(mnist5k, two_threads, monkeypatch):
    monkeypatch.setenv(parallel.PARTS_ENV, "2")
    images, labels = mnist5k
    index = np.random.default_rng(1).choice(len(labels), 320, replace=False)

    def trained(seed: int) -> list[np.ndarray]:
        net = model.new_model(0)
        training.train(net, images[index], labels[index], parse_settings({"seed": seed, "precision": "fp32"}), device=CPU)
        return model.get_parameters(net)

    first, again, other = trained(5), trained(5), trained(6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[4], other[4])
    assert parallel.batch_parts(CPU) == 2 and torch.get_num_threads() == 2


def test_each_part_draws_its_own_masks_from_the_seed():
    seeded = [g.initial_seed() for g in parallel.dropout_generators(2, 7, CPU)]
    assert len(set(seeded)) == 2  # the two halves of a batch must not share dropout masks
    assert seeded == [g.initial_seed() for g in parallel.dropout_generators(2, 7, CPU)]
    assert seeded != [g.initial_seed() for g in parallel.dropout_generators(2, 8, CPU)]
    assert [g.initial_seed() for g in parallel.dropout_generators(1, -3, CPU)]  # any integer seed


def test_a_node_can_choose_the_parts(monkeypatch):
    monkeypatch.setenv(parallel.PARTS_ENV, " 2 ")
    assert parallel.batch_parts(CPU) == 2  # a node whose cores are shared with other work
    monkeypatch.setenv(parallel.PARTS_ENV, "3")
    assert parallel.batch_parts(CPU) == 3
    assert parallel.batch_parts(torch.device("cuda")) == 1
    for bad in ("0", "two", "-1", "1.5", "auto"):
        monkeypatch.setenv(parallel.PARTS_ENV, bad)
        with pytest.raises(parallel.PartsSettingError, match=f"MNIST_EDGE_BATCH_PARTS must be a whole number >= 1, got '{bad}'"):
            parallel.batch_parts(CPU)

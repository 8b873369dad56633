"""Node-owned DP through the real EdgeClient: the node's budget, refusals, metadata, settings.

The package is started the way ``scaleout client start`` starts it (``test_edge.start``), with the
node's budget in its environment; the ledger lands in the node's data directory. Expected ε values come from Opacus's
``RDPAccountant`` directly, never from the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from scaleout.client.task_receiver import StoppedException

from mnist_edge import dpsgd, ledger, model, privacy, training
from mnist_edge.node import LEDGER_NAME, STATE_DIR, NodeConfigError, PrivacyLimits, privacy_from
from mnist_edge.settings import SettingsError, parse_settings
from test_edge import call, seed_model, start

N_TRAIN = 1000  # conftest.node_dir
DP_KEYS = {"dp_epsilon_round", "dp_epsilon_spent", "dp_delta", "dp_noise_multiplier", "dp_max_grad_norm",
           "dp_sample_rate", "dp_steps"}


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float = 1e-5) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta)


def one_round(batch_size: int = 200, sigma: float = 1.0, n: int = N_TRAIN) -> tuple[float, float, int]:
    """A DP round with the node's defaults (expected batch 200, one epoch): (σ, q, steps)."""
    q = batch_size / n
    return sigma, q, int(1 / q)


def planned_sigma(budget: float, rounds: int = 10) -> float:
    """The σ Opacus says makes ``rounds`` default rounds fit ``budget`` on a fresh node."""
    _, q, steps = one_round()
    return get_noise_multiplier(target_epsilon=budget, target_delta=1e-5, sample_rate=q, steps=rounds * steps,
                                epsilon_tolerance=1e-4)


@pytest.fixture
def ledger_file(node_dir):
    """Where the node's ledger lives: with its data."""
    return node_dir / STATE_DIR / LEDGER_NAME


@pytest.fixture
def node_with_budget(tmp_path, monkeypatch, node_dir):
    """Start a client whose node budget is ``epsilon`` (None: no budget), as an operator would."""
    def started_with(epsilon: float | None):
        if epsilon is None:
            monkeypatch.delenv("MNIST_EDGE_DP_EPSILON", raising=False)
        else:
            monkeypatch.setenv("MNIST_EDGE_DP_EPSILON", repr(float(epsilon)))
        return start(tmp_path, monkeypatch, node_dir)
    return started_with


def train(client, settings: dict, seed_path):
    """A train task; returns the update and its training metadata."""
    updated, meta = call(client, client.train_callback, seed_model(seed_path), settings)
    return updated, meta["training_metadata"]


# -- the node's budget --------------------------------------------------------------------------


def test_a_node_budget_makes_every_round_dp_and_the_update_carries_the_audit_numbers(
        node_with_budget, seed_path, ledger_file):
    client, runtime = node_with_budget(8)
    seed = seed_model(seed_path)
    _updated, meta = call(client, client.train_callback, seed, {"seed": 1})  # asks for nothing: DP anyway
    meta = meta["training_metadata"]

    assert DP_KEYS <= set(meta) and all(type(meta[k]) in (int, float) for k in DP_KEYS)
    sigma, q, steps = one_round(sigma=meta["dp_noise_multiplier"])
    assert sigma == pytest.approx(planned_sigma(8), rel=1e-3)  # the budget planned over 10 rounds
    assert (meta["dp_max_grad_norm"], meta["dp_delta"], meta["dp_rounds_left"]) == (0.1, 1e-5, 9)
    assert (meta["optimizer"], meta["batch_size"]) == ("sgd", 200)
    assert meta["learning_rate"] == pytest.approx(min(20.0, 27 / sigma))  # lr * sigma = 27, at most 20
    assert meta["dp_sample_rate"] == q and meta["dp_steps"] == steps == 5
    assert meta["dp_epsilon_round"] == pytest.approx(opacus_epsilon([(sigma, q, steps)]), rel=1e-12)
    assert meta["dp_epsilon_spent"] == meta["dp_epsilon_round"]
    assert meta["precision"] == "fp32"
    json.dumps(meta, allow_nan=False)
    # Poisson sampling draws exactly the charged number of batches; the abort check runs before each
    # (and once more in every log_metric).
    assert runtime.checks == steps + len(runtime.metrics)
    [record] = ledger.read(ledger_file).records
    assert record.epsilon_total == meta["dp_epsilon_spent"] and record.model_id == seed.model_id
    assert record.data_fingerprint == meta["data_fingerprint"]


def test_without_a_budget_dp_runs_only_when_the_round_asks(node_with_budget, seed_path, ledger_file):
    client, _ = node_with_budget(None)
    _, meta = train(client, {"seed": 1, "precision": "fp32"}, seed_path)
    assert not DP_KEYS & set(meta) and not (ledger_file).exists()

    _, meta = train(client, {"dp_noise_multiplier": 2.0, "dp_max_grad_norm": 0.5, "batch_size": 100}, seed_path)
    assert (meta["dp_noise_multiplier"], meta["dp_max_grad_norm"], meta["dp_steps"]) == (2.0, 0.5, 10)
    assert meta["dp_epsilon_round"] == pytest.approx(opacus_epsilon([(2.0, 0.1, 10)]), rel=1e-12)
    [record] = ledger.read(ledger_file).records
    assert record.budget is None


def test_the_round_after_the_planned_ones_fails_before_any_training(node_with_budget, seed_path, ledger_file,
                                                                     monkeypatch):
    monkeypatch.setenv("MNIST_EDGE_DP_ROUNDS", "2")
    client, runtime = node_with_budget(3)
    metas = [train(client, {}, seed_path)[1] for _ in range(2)]
    assert [m["dp_rounds_left"] for m in metas] == [1, 0]
    assert metas[1]["dp_epsilon_spent"] == pytest.approx(3.0, rel=2e-3) and metas[1]["dp_epsilon_spent"] <= 3.0
    checks, metrics = runtime.checks, len(runtime.metrics)

    result = None
    with pytest.raises(privacy.BudgetExceeded) as refused:
        result = train(client, {}, seed_path)
    message = str(refused.value)
    assert "no planned DP round is left (budget epsilon 3)" in message
    assert "planned 2 DP round(s) (MNIST_EDGE_DP_ROUNDS) and has charged 2" in message
    assert result is None  # no model to upload
    assert runtime.checks == checks and len(runtime.metrics) == metrics  # not one batch ran
    assert len(ledger.read(ledger_file).records) == 2  # a refusal is not charged


def test_a_round_that_would_pass_the_budget_is_refused_by_the_ledger(node_with_budget, seed_path, ledger_file):
    """A record charged elsewhere since the plan (another process on the same data) cannot push the total over."""
    first = opacus_epsilon([one_round()])
    both = opacus_epsilon([one_round()] * 2)
    budget = (first + both) / 2  # room for one round only
    ledger.charge(ledger_file, model_id="other", data_fingerprint="f", noise_multiplier=1.0, max_grad_norm=0.1,
                  sample_rate=0.2, steps=5, delta=1e-5, budget=budget)
    with pytest.raises(privacy.BudgetExceeded) as refused:
        ledger.charge(ledger_file, model_id="m", data_fingerprint="f", noise_multiplier=1.0, max_grad_norm=0.1,
                      sample_rate=0.2, steps=5, delta=1e-5, budget=budget)
    message = str(refused.value)
    assert f"spent epsilon {first:.4f}" in message and f"this round's epsilon {first:.4f}" in message
    assert f"total would be {both:.4f}" in message and f"budget epsilon {budget:g}" in message
    assert len(ledger.read(ledger_file).records) == 1  # a refusal is not charged


@pytest.mark.parametrize("settings,error,match", [
    ({"dp_delta": 0.1}, SettingsError, "'dp_delta' is the node's own limit"),
    ({"dp_budget": 100}, SettingsError, "'dp_budget' is the node's own limit"),
])
def test_a_round_cannot_set_the_node_limits(node_with_budget, seed_path, ledger_file, settings, error, match):
    client, runtime = node_with_budget(3)
    with pytest.raises(error, match=match):
        train(client, settings, seed_path)
    assert runtime.checks == 0 and not ledger.read(ledger_file).records


@pytest.mark.parametrize("settings", [{"dp_noise_multiplier": 0.3}, {"dp_epsilon": 6.0}])
def test_a_round_asking_for_less_noise_gets_the_planned_noise(node_with_budget, seed_path, settings):
    client, _ = node_with_budget(3)
    _, meta = train(client, settings, seed_path)
    assert meta["dp_noise_multiplier"] == pytest.approx(planned_sigma(3), rel=1e-3)
    assert meta["dp_rounds_left"] == 9


def test_a_round_can_tighten_the_node_budget(node_with_budget, seed_path):
    client, _ = node_with_budget(3)
    _, meta = train(client, {"dp_epsilon": 0.2, "dp_noise_multiplier": 1.0, "precision": "bf16"}, seed_path)
    sigma = get_noise_multiplier(target_epsilon=0.2, target_delta=1e-5, sample_rate=0.2, steps=5)
    assert meta["dp_noise_multiplier"] == sigma > max(1.0, planned_sigma(3))  # the largest sigma wins
    assert meta["dp_epsilon_round"] <= 0.2 and meta["precision"] == "fp32"


def test_an_aborted_dp_round_stays_charged(node_with_budget, seed_path, ledger_file):
    client, runtime = node_with_budget(8)
    runtime.abort_at_check = 3
    with pytest.raises(StoppedException):
        train(client, {}, seed_path)
    [record] = ledger.read(ledger_file).records
    assert record.steps == 5 and runtime.checks == 3  # charged in full: the node cannot know what leaked


def test_a_corrupt_ledger_fails_train_tasks_and_is_left_as_it_was(node_with_budget, seed_path, ledger_file):
    client, runtime = node_with_budget(8)
    train(client, {}, seed_path)
    path = ledger_file
    sigma = ledger.read(path).records[0].noise_multiplier
    text = path.read_text().replace(f'"noise_multiplier": {sigma!r}', '"noise_multiplier": 40.0')  # "more noise"
    assert text != path.read_text()
    path.write_text(text)
    checks = runtime.checks
    with pytest.raises(privacy.LedgerError, match=r"line 1: epsilon_round .* is not the .* that sigma"):
        train(client, {}, seed_path)
    assert path.read_text() == text and runtime.checks == checks


def test_validate_and_predict_are_not_charged(node_with_budget, seed_path, ledger_file):
    client, _ = node_with_budget(8)
    metrics = call(client, client.validate_callback, seed_model(seed_path))
    summary = call(client, client.inference_callback, seed_model(seed_path), {"data": "test"})
    assert not DP_KEYS & (set(metrics) | set(summary)) and not (ledger_file).exists()


@pytest.mark.parametrize("name,value,rule", [
    ("MNIST_EDGE_DP_EPSILON", "lots", "a number > 0"),
    ("MNIST_EDGE_DP_EPSILON", "-1", "a number > 0"),
    ("MNIST_EDGE_DP_EPSILON", "inf", "a number > 0"),
    ("MNIST_EDGE_DP_DELTA", "0", "a number between 0 and 1"),
    ("MNIST_EDGE_DP_DELTA", "1", "a number between 0 and 1"),
])
def test_a_bad_node_budget_fails_naming_the_variable(name, value, rule, tmp_path):
    with pytest.raises(NodeConfigError, match=f"environment variable {name} must be {rule}.*{value!r}"):
        privacy_from({name: value}, tmp_path, tmp_path)


def test_the_default_delta_and_no_budget(tmp_path):
    ledger_path = tmp_path / STATE_DIR / LEDGER_NAME
    assert privacy_from({}, tmp_path, tmp_path) == PrivacyLimits(None, 1e-5, ledger=ledger_path)
    assert privacy_from({"MNIST_EDGE_DP_EPSILON": "2", "MNIST_EDGE_DP_DELTA": "1e-6"}, tmp_path, tmp_path) == \
        PrivacyLimits(2.0, 1e-6, ledger=ledger_path)


# -- round settings -----------------------------------------------------------------------------


@pytest.mark.parametrize("raw,message", [
    ({"dp_noise_multiplier": 0}, "setting 'dp_noise_multiplier' must be a number from 1e-06 to 100, got 0"),
    ({"dp_noise_multiplier": "1"}, "setting 'dp_noise_multiplier' must be a number from 1e-06 to 100, got '1'"),
    ({"dp_noise_multiplier": True}, "setting 'dp_noise_multiplier' must be a number from 1e-06 to 100, got True"),
    ({"dp_max_grad_norm": -1.0}, "setting 'dp_max_grad_norm' must be a number from 1e-06 to 100, got -1.0"),
    ({"dp_max_grad_norm": float("inf")}, "setting 'dp_max_grad_norm' must be a number from 1e-06 to 100, got inf"),
    ({"dp_epsilon": float("nan")}, "setting 'dp_epsilon' must be a number > 0 and <= 100, got nan"),
    ({"dp_epsilon": 101}, "setting 'dp_epsilon' must be a number > 0 and <= 100, got 101"),
    ({"dp_sigma": 1.0}, "unknown setting 'dp_sigma'"),
])
def test_dp_settings_errors_name_the_key(raw, message):
    with pytest.raises(SettingsError) as error:
        parse_settings(raw)
    assert message in str(error.value)


def test_dp_settings_default_to_unset_and_are_floats():
    assert not parse_settings({}).asks_for_dp
    s = parse_settings({"dp_noise_multiplier": 2, "dp_max_grad_norm": 1, "dp_epsilon": None})
    assert (s.dp_noise_multiplier, s.dp_max_grad_norm, s.dp_epsilon) == (2.0, 1.0, None) and s.asks_for_dp
    assert isinstance(s.dp_noise_multiplier, float)


def test_an_unreachable_epsilon_target_is_refused_naming_the_setting():
    with pytest.raises(privacy.PrivacyError, match="setting 'dp_epsilon' 0.01 cannot be reached"):
        privacy.plan_round(parse_settings({"dp_epsilon": 0.01}), 1000, PrivacyLimits())


def test_sample_rate_is_batch_size_over_n_and_steps_what_the_sampler_draws():
    plan = privacy.plan_round(parse_settings({"batch_size": 30, "epochs": 3}), 700, PrivacyLimits(5.0))
    assert plan.sample_rate == 30 / 700 and plan.steps == 3 * 23  # int(700 / 30) batches per epoch
    small = privacy.plan_round(parse_settings({"batch_size": 64}), 40, PrivacyLimits(5.0))
    assert (small.sample_rate, small.steps, small.expected_batch_size) == (1.0, 1, 40)


# -- the DP-SGD itself ----------------------------------------------------------------------------


def held_out(mnist5k):
    images, labels = mnist5k
    order = np.random.default_rng(0).permutation(len(labels))
    return images[order[:1000]], labels[order[:1000]], images[order[4000:]], labels[order[4000:]]


@pytest.mark.slow
def test_dp_sgd_learns_on_real_mnist(mnist5k):
    x, y, x_test, y_test = held_out(mnist5k)
    settings = parse_settings({"dp_noise_multiplier": 0.5, "epochs": 3})  # the node's DP defaults otherwise
    net = model.new_model(0)
    before = training.evaluate(net, x_test, y_test)[1]
    plan = privacy.plan_round(settings, len(y), PrivacyLimits())
    result = dpsgd.train_private(net, x, y, plan)
    after = training.evaluate(net, x_test, y_test)[1]
    assert before < 0.15 and after > 0.3, (before, after)
    assert result.batches == plan.steps and result.precision == "fp32"


def test_per_sample_gradients_are_clipped_to_c(mnist5k):
    """One full-batch step (q = 1) with almost no noise moves the weights by at most lr * C."""
    x, y, _, _ = held_out(mnist5k)
    c = 1e-3
    settings = parse_settings({"batch_size": 64, "optimizer": "sgd", "learning_rate": 1.0,
                               "dp_noise_multiplier": 1e-6, "dp_max_grad_norm": c})
    net = model.new_model(0)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    plan = privacy.plan_round(settings, 64, PrivacyLimits())
    dpsgd.train_private(net, x[:64], y[:64], plan)
    moved = float((torch.cat([p.detach().flatten() for p in net.parameters()]) - before).norm())
    assert 0.05 * c < moved <= c * 1.001, moved  # unclipped, the seed model's gradient is ~1


def test_the_noise_does_not_follow_the_rounds_seed(mnist5k):
    x, y, _, _ = held_out(mnist5k)
    settings = parse_settings({"batch_size": 100, "seed": 7, "dp_noise_multiplier": 1.0})
    plan = privacy.plan_round(settings, 200, PrivacyLimits())
    weights = []
    for _ in range(2):
        net = model.new_model(0)
        dpsgd.train_private(net, x[:200], y[:200], plan)
        weights.append(model.get_parameters(net)[:6])  # conv1, conv2, fc1: fc2 is not trained (dpsgd.FROZEN)
    assert not any(np.array_equal(a, b) for a, b in zip(weights[0], weights[1], strict=True))


def test_a_dp_round_keeps_the_frozen_layers_and_gives_them_back_trainable(mnist5k):
    x, y, _, _ = held_out(mnist5k)
    plan = privacy.plan_round(parse_settings({"dp_noise_multiplier": 1.0}), 200, PrivacyLimits())
    net = model.new_model(0)
    before = model.get_parameters(net)
    dpsgd.train_private(net, x[:200], y[:200], plan)
    after = model.get_parameters(net)
    names = [name for name, _ in net.named_parameters()]
    for name, old, new in zip(names, before, after, strict=True):
        assert np.array_equal(old, new) == (name.split(".")[0] in dpsgd.FROZEN), name
    assert all(p.requires_grad for p in net.parameters()) and net.training


def test_empty_poisson_batches_still_step_and_report_finite_metrics(mnist5k):
    x, y, _, _ = held_out(mnist5k)
    settings = parse_settings({"batch_size": 1, "dp_noise_multiplier": 1.0})
    plan = privacy.plan_round(settings, 40, PrivacyLimits())  # P(empty batch) = 0.975^40 ~ 36 %
    seen = []
    net = model.new_model(0)
    result = dpsgd.train_private(net, x[:40], y[:40], plan, on_batch=lambda: seen.append(1))
    assert len(seen) == result.batches == 40
    assert np.isfinite(result.training_loss) and 0 <= result.training_accuracy <= 1
    assert all(np.isfinite(p).all() for p in model.get_parameters(net))
    assert not any(hasattr(p, "grad_sample") for p in net.parameters())  # back to a plain CNN


def test_a_dp_round_leaves_the_shared_cnn_unwrapped(node_with_budget, seed_path):
    client, _ = node_with_budget(None)
    tasks = client.train_callback.__self__
    train(client, {"batch_size": 500, "dp_noise_multiplier": 1.0}, seed_path)
    assert type(tasks.net) is model.Net and not tasks.net._forward_hooks
    assert all(not m._forward_hooks and not m._backward_hooks for m in tasks.net.modules())
    _, meta = train(client, {"seed": 2}, seed_path)  # the next plain round trains as usual
    assert not DP_KEYS & set(meta) and meta["num_examples"] == N_TRAIN

"""No typo turns privacy off: node variables fail closed, DP settings stay in the accountant's domain.

The node variables are read where ``scaleout client start`` runs ``startup.py`` (a real
``EdgeClient``, the environment set first): a value the package cannot use is logged at start and
fails every task naming the variable. A round's ``dp_*`` settings are refused by name before
anything is charged to the node's privacy ledger.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mnist_edge import dpsgd, model, privacy
from mnist_edge.node import LEDGER_NAME, STATE_DIR, NodeConfig, NodeConfigError, PrivacyLimits
from mnist_edge.privacy import PrivacyError
from mnist_edge.settings import SettingsError, TrainSettings, parse_settings
from test_edge import call, seed_model, start

BAD_VALUES = {
    "MNIST_EDGE_THREADS": ["", "  ", "nan", "inf", "0", "1025", "1e3", "\uff12", "99999999999999999999"],
    "MNIST_EDGE_DP_EPSILON": ["", " \t", "nan", "inf", "-inf", "0", "-1", "101", "1e-400", "1e999", "5 eps"],
    "MNIST_EDGE_DP_DELTA": ["", "nan", "inf", "0", "1", "1e-400", "-0.1"],
    "MNIST_EDGE_DP_ROUNDS": ["", "nan", "0", "10001", "99999999999999999999", "2.5"],
    "MNIST_EDGE_DP_LEDGER": ["", "   "],
    "MNIST_EDGE_DP_EPSILO": ["8"],  # a typo of the budget's name
}
CASES = [(name, value) for name, values in BAD_VALUES.items() for value in values]


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_a_node_variable_it_cannot_use_is_logged_at_start_and_fails_every_task(
        tmp_path, monkeypatch, node_dir, seed_path, name, value):
    monkeypatch.setenv(name, value)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # the package's logger does not propagate once the client configured it
    logging.getLogger("mnist_edge").addHandler(handler)
    try:
        client, _ = start(tmp_path, monkeypatch, node_dir)
    finally:
        logging.getLogger("mnist_edge").removeHandler(handler)
    assert any(name in r.getMessage() and "every task will fail" in r.getMessage() for r in records)
    for task, args in ((client.train_callback, ({},)), (client.inference_callback, ({},))):
        with pytest.raises(NodeConfigError, match=name):
            call(client, task, seed_model(seed_path), *args)
    assert not (node_dir / STATE_DIR).exists()  # nothing charged, nothing written


@pytest.mark.parametrize("value", ["4", "", "3000000", "99999999999999999999"])
def test_the_removed_batch_parts_variable_is_refused_by_name_with_the_reason(
        tmp_path, monkeypatch, node_dir, seed_path, value):
    """A node configured for an older version still sets ``MNIST_EDGE_BATCH_PARTS``: it is told the
    variable is gone and to unset it, not shown a list of names to guess from."""
    monkeypatch.setenv("MNIST_EDGE_BATCH_PARTS", value)
    client, _ = start(tmp_path, monkeypatch, node_dir)
    with pytest.raises(NodeConfigError) as error:
        call(client, client.train_callback, seed_model(seed_path), {})
    assert str(error.value) == ("node variable MNIST_EDGE_BATCH_PARTS is no longer read (training no longer "
                                "splits a batch into parts); unset it")


DP_EXTREMES = [("dp_noise_multiplier", 1e-200), ("dp_noise_multiplier", 1e308), ("dp_noise_multiplier", 1e154),
               ("dp_max_grad_norm", 1e308), ("dp_max_grad_norm", 1e-200), ("dp_noise_multiplier", 5e-324)]


@pytest.mark.parametrize("key, value", DP_EXTREMES, ids=[f"{k}={v:g}" for k, v in DP_EXTREMES])
def test_a_dp_setting_outside_the_accountants_domain_is_refused_before_any_charge(
        tmp_path, monkeypatch, node_dir, seed_path, key, value):
    """σ = 1e-200 divided by zero in the accountant, 1e308 overflowed, C = 1e308 was charged and
    then filled the weights with inf: each is now refused naming the setting, the ledger untouched."""
    monkeypatch.setenv("MNIST_EDGE_DP_EPSILON", "50")
    client, _ = start(tmp_path, monkeypatch, node_dir)
    with pytest.raises(SettingsError, match=f"^setting '{key}' must be a number from 1e-06 to 100, got "):
        call(client, client.train_callback, seed_model(seed_path), {key: value, "batch_size": 100})
    assert not (node_dir / STATE_DIR / LEDGER_NAME).exists()


@pytest.mark.parametrize("settings", [
    TrainSettings(dp_noise_multiplier=1e-200), TrainSettings(dp_noise_multiplier=1e308),
    TrainSettings(dp_noise_multiplier=1e154), TrainSettings(dp_max_grad_norm=1e308),
    TrainSettings(dp_noise_multiplier=1e6, dp_max_grad_norm=1.0),
], ids=["sigma-1e-200", "sigma-1e308", "sigma-1e154", "C-1e308", "sigma-C-1e6"])
def test_plan_round_refuses_what_the_accountant_cannot_bound(settings, tmp_path):
    """The library's own check, for callers that build settings without ``parse_settings``: a
    PrivacyError naming the setting, never ZeroDivisionError or OverflowError, and no ledger line."""
    limits = PrivacyLimits(epsilon=50.0, ledger=tmp_path / LEDGER_NAME)
    with pytest.raises(PrivacyError, match=r"setting 'dp_(noise_multiplier|max_grad_norm)' .* is outside "
                                           r"\[1e-06, 100\].*refused before charging"):
        privacy.plan_round(settings, 1000, limits)
    assert not limits.ledger.exists()


@pytest.mark.parametrize("sigma, c", [(100.0, 100.0), (1e-6, 1e-6)])
def test_the_dp_limits_themselves_train_finite_weights(mnist5k, tmp_path, sigma, c):
    """At the bounds a DP round is accounted and charged, and its weights stay finite (default optimizer)."""
    images, labels = mnist5k
    settings = parse_settings({"batch_size": 50, "dp_noise_multiplier": sigma, "dp_max_grad_norm": c})
    node = NodeConfig.for_data(tmp_path, epsilon=None)
    plan = privacy.plan_round(settings, 200, node.privacy)
    net = model.new_model(0)
    result, meta = privacy.train_round(net, images[:200], labels[:200], plan, node.privacy,
                                       model_id="m", data_fingerprint="f")
    assert meta["dp_noise_multiplier"] == sigma and np.isfinite(meta["dp_epsilon_round"])
    assert all(torch.isfinite(p).all() for p in net.parameters()) and result.batches == plan.steps
    assert isinstance(plan, dpsgd.RoundPlan)

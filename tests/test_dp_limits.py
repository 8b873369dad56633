"""A δ that makes no sense for the node, and DP settings past where the accounting stays finite, are
refused before anything is charged; the refusal names the variable or the setting.

Through the real EdgeClient (``test_edge.start``) where a node's operator or a server would meet it.
"""

from __future__ import annotations

import logging
import math
import re

import pytest

from conftest import make_node
from mnist_edge import ledger, privacy
from mnist_edge.node import LEDGER_NAME, STATE_DIR, PrivacyLimits
from mnist_edge.settings import SettingsError, parse_settings
from test_edge import call, seed_model, start


@pytest.fixture
def small_node(tmp_path, mnist5k):
    """A node of 64 training images: 1/n = 0.015625."""
    images, labels = mnist5k
    return make_node(tmp_path / "small", images, labels, 64, 20)


def started(tmp_path, monkeypatch, data_dir, **variables):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return start(tmp_path, monkeypatch, data_dir)


@pytest.fixture
def warnings_seen():
    """What the package logs at WARNING (its logger does not propagate once a client has started)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep(logging.WARNING)
    logger = logging.getLogger("mnist_edge")
    logger.addHandler(keep)
    yield seen
    logger.removeHandler(keep)


@pytest.mark.parametrize("delta", ["0.5", "0.015625"])  # 1/n itself is refused too
def test_a_delta_of_1_over_n_or_more_is_refused_before_charging(tmp_path, monkeypatch, small_node, seed_path,
                                                                 delta):
    client, runtime = started(tmp_path, monkeypatch, small_node, MNIST_EDGE_DP_EPSILON="3",
                              MNIST_EDGE_DP_DELTA=delta)
    with pytest.raises(privacy.PrivacyError) as refused:
        call(client, client.train_callback, seed_model(seed_path), {"dp_noise_multiplier": 0.5})
    assert str(refused.value) == (
        f"MNIST_EDGE_DP_DELTA {float(delta):g} is not below 1/n = 0.015625 for this node's n = 64 training images: "
        "with such a delta the guarantee allows publishing an image in the clear; refused before charging. "
        "Set MNIST_EDGE_DP_DELTA below 1/(10 n) = 0.0015625")
    assert runtime.checks == 0 and not (small_node / STATE_DIR / LEDGER_NAME).exists()


def test_a_delta_above_1_over_10n_trains_with_a_warning_and_below_without(warnings_seen):
    settings = parse_settings({"dp_noise_multiplier": 1.0})
    assert privacy.plan_round(settings, 64, PrivacyLimits(delta=0.01)) is not None
    assert warnings_seen == ["MNIST_EDGE_DP_DELTA 0.01 is above 1/(10 n) = 0.0015625 for this node's n = 64 "
                             "training images: a delta well below 1/n is what the guarantee needs"]
    warnings_seen.clear()
    privacy.plan_round(settings, 64, PrivacyLimits(delta=0.0015))
    privacy.plan_round(settings, 1000, PrivacyLimits())  # the default 1e-5 on a node of 1,000
    assert warnings_seen == []


@pytest.mark.parametrize("settings,message", [
    ({"dp_noise_multiplier": 1e308}, "setting 'dp_noise_multiplier' must be a number from 1e-06 to 100, got 1e+308"),
    ({"dp_noise_multiplier": 1e-300}, "setting 'dp_noise_multiplier' must be a number from 1e-06 to 100, got 1e-300"),
    ({"dp_noise_multiplier": 5e-324}, "setting 'dp_noise_multiplier' must be a number from 1e-06 to 100, got 5e-324"),
    ({"dp_max_grad_norm": 1e308}, "setting 'dp_max_grad_norm' must be a number from 1e-06 to 100, got 1e+308"),
    ({"dp_max_grad_norm": 1e-9}, "setting 'dp_max_grad_norm' must be a number from 1e-06 to 100, got 1e-09"),
])
def test_dp_settings_past_their_bounds_are_refused_before_charging(tmp_path, monkeypatch, node_dir, seed_path,
                                                                   settings, message):
    client, runtime = started(tmp_path, monkeypatch, node_dir, MNIST_EDGE_DP_EPSILON="8")
    with pytest.raises(SettingsError) as refused:
        call(client, client.train_callback, seed_model(seed_path), settings)
    assert str(refused.value) == message
    assert runtime.checks == 0 and not (node_dir / STATE_DIR / LEDGER_NAME).exists()


@pytest.mark.parametrize("sigma,clip", [(1e-6, 1.0), (100.0, 100.0), (1.0, 1e-6)])
def test_the_bounds_themselves_account_to_a_finite_epsilon(tmp_path, sigma, clip):
    plan = privacy.plan_round(parse_settings({"dp_noise_multiplier": sigma, "dp_max_grad_norm": clip,
                                              "batch_size": 50}), 1000, PrivacyLimits())
    charged = ledger.charge(tmp_path / LEDGER_NAME, model_id="m", data_fingerprint="f",
                            noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                            sample_rate=plan.sample_rate, steps=plan.steps, delta=plan.delta, budget=None)
    assert math.isfinite(charged.record.epsilon_total) and charged.record.epsilon_total > 0


def test_an_epsilon_target_that_needs_more_noise_than_the_bound_names_the_setting():
    # q = 1 over 1,000 epochs: an epsilon just above the accountant's floor needs a sigma in the thousands
    settings = parse_settings({"dp_epsilon": 0.105, "batch_size": 64, "epochs": 1000})
    with pytest.raises(privacy.PrivacyError, match=r"setting 'dp_epsilon' 0.105 needs sigma [\d.e+]+, above the "
                                                   r"largest dp_noise_multiplier 100"):
        privacy.plan_round(settings, 64, PrivacyLimits(delta=1e-5))


@pytest.mark.parametrize("sigma", [1e-300, 5e-324, 1e200])
def test_the_ledger_itself_refuses_a_sigma_the_accountant_cannot_count(tmp_path, sigma):
    """Below the plan, the charge is the last line: no record for a round without a finite epsilon."""
    path = tmp_path / LEDGER_NAME
    with pytest.raises(privacy.PrivacyError, match=re.escape(f"dp_noise_multiplier {sigma:g} cannot be accounted")):
        ledger.charge(path, model_id="m", data_fingerprint="f", noise_multiplier=sigma, max_grad_norm=1.0,
                      sample_rate=0.1, steps=10, delta=1e-5, budget=None)
    assert not path.exists()

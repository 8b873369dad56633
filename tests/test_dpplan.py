"""A budget alone plans its rounds: σ is the least noise that lets the planned rounds fit, as the ledger charges them.

Every plan comes from ``privacy.plan_round`` on a node with only a budget and is charged into a real
ledger file with that budget; the expected ε come from Opacus's ``RDPAccountant``, not from the
code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from mnist_edge import dpplan, ledger, privacy, status
from mnist_edge.node import LEDGER_NAME, NodeConfig, PrivacyLimits
from mnist_edge.settings import parse_settings

DELTA = 1e-5
N = 800  # the node's images: the default DP batch 200 gives q 0.25, 4 steps an epoch


def limits(tmp_path, budget: float, rounds: int = 10) -> PrivacyLimits:
    return PrivacyLimits(epsilon=budget, delta=DELTA, rounds=rounds, ledger=tmp_path / LEDGER_NAME)


def charge(node: PrivacyLimits, plan) -> ledger.Charged:
    return ledger.charge(node.ledger, model_id="m", data_fingerprint="f", noise_multiplier=plan.noise_multiplier,
                         max_grad_norm=plan.max_grad_norm, sample_rate=plan.sample_rate, steps=plan.steps,
                         delta=plan.delta, budget=node.epsilon)


def opacus_epsilon(plans) -> float:
    accountant = RDPAccountant()
    accountant.history = [(p.noise_multiplier, p.sample_rate, p.steps) for p in plans]
    return accountant.get_epsilon(DELTA)


@pytest.mark.parametrize("budget", [1.0, 3.0, 8.0])
def test_a_budget_alone_serves_every_planned_round_and_spends_it_all(tmp_path, budget):
    node, plans = limits(tmp_path, budget), []
    for expected_left in range(9, -1, -1):
        plans.append(privacy.plan_round(parse_settings({}), N, node))
        assert plans[-1].rounds_left == expected_left
        charge(node, plans[-1])  # never refused
    spent = ledger.read(node.ledger).spent
    assert spent <= budget
    assert spent == pytest.approx(budget, rel=2e-3)  # nothing of the budget is left unused
    assert opacus_epsilon(plans) == pytest.approx(spent, rel=1e-9)
    with pytest.raises(privacy.BudgetExceeded, match="no planned DP round is left.*MNIST_EDGE_DP_ROUNDS"):
        privacy.plan_round(parse_settings({}), N, node)


def test_the_plan_is_the_least_noise_that_fits_and_agrees_with_opacus(tmp_path):
    plan = privacy.plan_round(parse_settings({}), N, limits(tmp_path, 3.0))
    assert (plan.sample_rate, plan.steps) == (0.25, 4)
    assert opacus_epsilon([plan] * 10) <= 3.0
    less = plan.noise_multiplier * (1 - 2 * dpplan.RELATIVE_TOLERANCE)
    assert privacy.ledger.epsilon(10 * privacy.ledger.round_rdp(less, 0.25, 4), DELTA) > 3.0
    expected = get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=0.25, steps=40,
                                    epsilon_tolerance=1e-4)
    assert plan.noise_multiplier == pytest.approx(expected, rel=1e-3)


def test_a_round_that_asks_for_more_noise_gets_it_and_later_rounds_spend_what_it_left(tmp_path):
    node = limits(tmp_path, 3.0, rounds=5)
    planned = privacy.plan_round(parse_settings({}), N, node).noise_multiplier
    noisy = privacy.plan_round(parse_settings({"dp_noise_multiplier": 2 * planned}), N, node)
    assert noisy.noise_multiplier == 2 * planned
    charge(node, noisy)
    later = privacy.plan_round(parse_settings({}), N, node)
    assert later.noise_multiplier < planned  # the budget the noisy round saved goes to the rounds after it
    for _round in range(4):
        charge(node, privacy.plan_round(parse_settings({}), N, node))
    assert ledger.read(node.ledger).spent == pytest.approx(3.0, rel=2e-3)


def test_a_round_never_gets_less_noise_than_planned(tmp_path):
    node = limits(tmp_path, 3.0)
    planned = privacy.plan_round(parse_settings({}), N, node).noise_multiplier
    asked = privacy.plan_round(parse_settings({"dp_noise_multiplier": planned / 2}), N, node)
    assert asked.noise_multiplier == planned
    loose = privacy.plan_round(parse_settings({"dp_epsilon": 50.0}), N, node)
    assert loose.noise_multiplier == planned


def test_a_spent_budget_has_no_plan(tmp_path):
    node = limits(tmp_path, 3.0)
    charge(PrivacyLimits(epsilon=None, delta=DELTA, ledger=node.ledger),
           privacy.plan_round(parse_settings({"dp_noise_multiplier": 0.6}), N, PrivacyLimits(delta=DELTA)))
    spent = ledger.read(node.ledger).spent
    with pytest.raises(privacy.BudgetExceeded, match=f"{spent:.4f} is spent already"):
        privacy.plan_round(parse_settings({}), N, limits(tmp_path, spent))


def test_no_rounds_left_is_refused_not_planned():
    with pytest.raises(dpplan.PlanError, match="no planned DP round is left"):
        dpplan.plan_sigma(budget=3.0, delta=DELTA, spent_rdp=np.zeros(len(ledger.ORDERS)), rounds=0,
                          sample_rate=0.25, steps=4)
    assert dpplan.rounds_left(10, 12) == 0


def test_a_dp_round_takes_the_node_defaults_where_the_round_is_silent():
    plan = privacy.plan_round(parse_settings({"epochs": 2}), N, PrivacyLimits(epsilon=3.0, delta=DELTA))
    assert (plan.settings.optimizer, plan.settings.batch_size, plan.settings.epochs) == ("sgd", 200, 2)
    assert plan.max_grad_norm == privacy.DEFAULT_MAX_GRAD_NORM == 0.1
    # the learning rate shrinks as the noise grows: lr * sigma = 27, and never above 20
    assert plan.noise_multiplier > 1.35 and plan.settings.learning_rate == pytest.approx(27 / plan.noise_multiplier)
    loose = privacy.plan_round(parse_settings({}), N, PrivacyLimits(epsilon=50.0, delta=DELTA))
    assert loose.noise_multiplier < 1.35 and loose.settings.learning_rate == 20.0
    asked = privacy.plan_round(parse_settings({"dp_noise_multiplier": 9.0}), N, PrivacyLimits(delta=DELTA))
    assert asked.settings.learning_rate == 3.0
    own = privacy.plan_round(parse_settings({"optimizer": "adam", "learning_rate": 0.01, "batch_size": 100}), N,
                             PrivacyLimits(epsilon=3.0, delta=DELTA))
    assert (own.settings.optimizer, own.settings.learning_rate, own.settings.batch_size) == ("adam", 0.01, 100)
    assert own.sample_rate == 100 / N


def test_the_node_status_says_how_many_planned_rounds_are_left(tmp_path):
    node = NodeConfig.for_data(tmp_path, epsilon=3.0, rounds=4)
    charged = charge(node.privacy, privacy.plan_round(parse_settings({}), N, node.privacy))
    answer = status.privacy_status(node)
    assert (answer["planned_rounds"], answer["charged_rounds"], answer["planned_rounds_left"]) == (4, 1, 3)
    assert answer["spent_epsilon"] == charged.record.epsilon_total
    assert answer["left_epsilon"] == pytest.approx(3.0 - charged.record.epsilon_total)
    assert "planned DP rounds left: 3 of 4" in privacy.describe(node.privacy)

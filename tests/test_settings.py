"""Round settings: defaults, accepted values, and messages that name the key."""

from __future__ import annotations

import pytest

from mnist_edge.settings import SettingsError, TrainSettings, capped_batch_size, parse_settings


def test_defaults_are_the_pytorch_example():
    assert parse_settings(None) == parse_settings({}) == TrainSettings(
        epochs=1, batch_size=64, learning_rate=1.0, optimizer="adadelta", seed=None, precision="auto"
    )


def test_valid_values_are_accepted_and_normalised():
    s = parse_settings({"epochs": 3, "batch_size": 32, "learning_rate": 1, "optimizer": "SGD", "seed": 5,
                        "precision": "fp32"})
    assert (s.epochs, s.batch_size, s.learning_rate, s.optimizer, s.seed, s.precision) == (3, 32, 1.0, "sgd", 5, "fp32")
    assert isinstance(s.learning_rate, float)


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"epochs": 0}, "setting 'epochs' must be an integer from 1 to 1000, got 0"),
        ({"epochs": 1.5}, "setting 'epochs' must be an integer from 1 to 1000, got 1.5"),
        ({"epochs": True}, "setting 'epochs' must be an integer from 1 to 1000, got True"),
        ({"batch_size": "64"}, "setting 'batch_size' must be an integer from 1 to 1024, got '64'"),
        ({"learning_rate": 0}, "setting 'learning_rate' must be a number > 0 and <= 1000, got 0"),
        ({"learning_rate": float("nan")}, "setting 'learning_rate' must be a number > 0 and <= 1000, got nan"),
        ({"optimizer": "rmsprop"}, "setting 'optimizer' must be one of adadelta, sgd, adam, got 'rmsprop'"),
        ({"precision": "fp16"}, "setting 'precision' must be one of auto, fp32, bf16, got 'fp16'"),
        ({"seed": "1"}, "setting 'seed' must be an integer from 0 to 2**63-1, got '1'"),
        ({"epoch": 2}, "unknown setting 'epoch'; accepted settings are: epochs, batch_size, learning_rate"),
    ],
)
def test_invalid_settings_name_the_key_and_accepted_values(raw, message):
    with pytest.raises(SettingsError) as error:
        parse_settings(raw)
    assert message in str(error.value)


def test_the_limits_themselves_are_accepted():
    s = parse_settings({"epochs": 1000, "batch_size": 1024, "learning_rate": 1000, "seed": 2**63 - 1,
                        "dp_epsilon": 100, "dp_noise_multiplier": 100, "dp_max_grad_norm": 100})
    assert (s.epochs, s.batch_size, s.learning_rate, s.seed) == (1000, 1024, 1000.0, 2**63 - 1)
    assert (s.dp_epsilon, s.dp_noise_multiplier, s.dp_max_grad_norm) == (100.0, 100.0, 100.0)
    assert all(type(v) is float for v in (s.dp_epsilon, s.dp_noise_multiplier, s.dp_max_grad_norm))
    low = parse_settings({"epochs": 1, "batch_size": 1, "learning_rate": 1e-300, "seed": 0,
                          "dp_noise_multiplier": 1e-6, "dp_max_grad_norm": 1e-6})
    assert (low.epochs, low.batch_size, low.learning_rate, low.seed) == (1, 1, 1e-300, 0)
    assert (low.dp_noise_multiplier, low.dp_max_grad_norm) == (1e-6, 1e-6)


@pytest.mark.parametrize("key, value", [
    ("epochs", 1001), ("batch_size", 1025), ("seed", 2**63), ("learning_rate", 1000.0001),
    ("learning_rate", float("inf")), ("dp_epsilon", 100.5), ("dp_epsilon", float("inf")),
    ("dp_noise_multiplier", float("inf")), ("dp_noise_multiplier", 0), ("dp_max_grad_norm", float("inf")),
    ("dp_max_grad_norm", float("nan")), ("dp_max_grad_norm", "1"), ("epochs", None), ("learning_rate", None),
    ("dp_noise_multiplier", 100.0001), ("dp_noise_multiplier", 0.99e-6), ("dp_max_grad_norm", 100.0001),
    ("dp_max_grad_norm", 0.99e-6),
])
def test_one_past_a_limit_is_refused(key, value):
    """Anything past a bound is refused with a SettingsError naming the key: ``learning_rate: inf`` by its
    upper bound (there is no other inf check), every ``dp_*`` inf and a ``dp_*`` value just outside its range
    at either end (σ and C from 1e-6 to 100: the accountant's domain) by that range, a wrong type or a None
    where a number is required too."""
    with pytest.raises(SettingsError, match=f"^setting '{key}' must be "):
        parse_settings({key: value})


def test_none_leaves_the_seed_and_the_dp_settings_unset():
    s = parse_settings({"seed": None, "dp_epsilon": None, "dp_noise_multiplier": None, "dp_max_grad_norm": None,
                        "epochs": 2})
    assert s.seed is None and not s.asks_for_dp and s.epochs == 2  # and the keys after a None are read too
    assert parse_settings({"dp_noise_multiplier": 1.1}).asks_for_dp


def test_the_nodes_own_privacy_limits_cannot_be_set_by_a_round():
    with pytest.raises(SettingsError) as error:
        parse_settings({"epochs": 1, "dp_delta": 1e-5})
    assert str(error.value) == ("setting 'dp_delta' is the node's own limit (MNIST_EDGE_DP_DELTA on the node); "
                                "a round cannot set it")
    with pytest.raises(SettingsError, match=r"^setting 'dp_budget' is the node's own limit \(MNIST_EDGE_DP_EPSILON"):
        parse_settings({"dp_budget": 8})


def test_messages_show_short_values_whole_and_long_ones_cut():
    """A value's repr is shown whole up to 40 characters, else its first 40 and its length."""
    with pytest.raises(SettingsError) as error:
        parse_settings({"optimizer": "x" * 38})  # repr: 40 characters
    assert str(error.value).endswith("got '" + "x" * 38 + "'")
    with pytest.raises(SettingsError) as error:
        parse_settings({"optimizer": "y" * 39})
    assert str(error.value).endswith("got '" + "y" * 39 + "... (41 characters)")


@pytest.mark.parametrize("examples, batch_size", [(100, 64), (64, 64), (63, 63), (0, 64), (1, 1)])
def test_a_batch_is_capped_at_the_number_of_examples(examples, batch_size):
    capped = capped_batch_size(parse_settings({"learning_rate": 0.5}), examples)
    assert capped.batch_size == batch_size and capped.learning_rate == 0.5


def test_the_settings_as_a_dict_are_every_field():
    assert parse_settings({"epochs": 2, "seed": 3}).as_dict() == {
        "epochs": 2, "batch_size": 64, "learning_rate": 1.0, "optimizer": "adadelta", "seed": 3, "precision": "auto",
        "dp_noise_multiplier": None, "dp_max_grad_norm": None, "dp_epsilon": None}


@pytest.mark.parametrize("raw, key", [
    ({"seed": None, "epochs": 0}, "epochs"),
    ({"dp_epsilon": None, "optimizer": "rmsprop"}, "optimizer"),
])
def test_a_none_does_not_end_the_checks_of_the_settings_after_it(raw, key):
    """A setting given as None (meaning "the default") does not stop the checks: every setting after it is
    still checked."""
    with pytest.raises(SettingsError, match=f"^setting '{key}' must be "):
        parse_settings(raw)

"""Round settings: defaults, accepted values, and messages that name the key."""

from __future__ import annotations

import pytest

from mnist_edge.settings import SettingsError, TrainSettings, parse_settings


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

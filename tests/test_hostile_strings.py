"""Every string a task controls is bounded before it is used, stored or echoed.

A hostile server sends a 1 MB model id, an 80 KB ``output`` or ``data``, settings keys and values
of any size or shape. Each is refused before the task uses it, with a message of a few hundred
characters at most, and nothing of it is stored: no ledger line, no metadata, no file.
"""

from __future__ import annotations

import pytest

from hostile import scaleout_model, seed_params, with_id
from mnist_edge import data, runtime
from mnist_edge.errors import UserError
from mnist_edge.node import LEDGER_NAME, STATE_DIR, NodeConfig

MAX_MESSAGE = 400
HUGE_ID = "m" * 1_000_000


@pytest.fixture(scope="module")
def seed(seed_path):
    return scaleout_model(seed_params(seed_path))


@pytest.fixture
def budget_node(tmp_path, mnist5k):
    """A node with a privacy budget (every train task charges the ledger) and a predict split."""
    images, labels = mnist5k
    root = tmp_path / "node"
    data.write_shard(root / "train" / "s.csv", images[:100], labels[:100])
    data.write_shard(root / "predict" / "p.csv", images[100:110], labels[100:110])
    (tmp_path / "work").mkdir()
    recorder = runtime.LocalRuntime()
    client = runtime.local_client(NodeConfig.for_data(root, epsilon=50.0), recorder, workdir=tmp_path / "work")
    return root, client, recorder


def refused(client, task: str, *args) -> str:
    """The task's error (it must fail with a UserError) after checking its length."""
    with pytest.raises(UserError) as error:
        runtime.run_task(client, task, *args, model_id="m", round_id="r")
    message = str(error.value)
    assert len(message) <= MAX_MESSAGE, f"{len(message)} characters: {message[:200]}"
    return message


@pytest.mark.parametrize("model_id", [HUGE_ID, "m" * 129, "модель", "a b", "id\nwith-newline", "../x", ".x", ""])
def test_a_model_id_that_is_not_a_plain_name_is_refused_before_any_use(budget_node, seed, model_id):
    """No ledger line, no metadata, no default output named after it, in any of the three tasks."""
    root, client, recorder = budget_node
    hostile = with_id(seed, model_id)
    for task, args in (("train", ({"epochs": 1},)), ("validate", ()), ("predict", ({},))):
        message = refused(client, task, hostile, *args)
        assert "model id" in message and "is not one this node accepts" in message
    assert not (root / STATE_DIR / LEDGER_NAME).exists() and not (root / "predictions").exists()
    assert all(len(str(a)) <= MAX_MESSAGE for a in recorder.attributes)  # validate's validation_error


def test_a_uuid_and_a_128_character_id_are_accepted(budget_node, seed):
    root, client, _ = budget_node
    runtime.run_task(client, "predict", with_id(seed, "0b7c9f1e-5d2a-4c33-9a51-3f0e6f6d2b10"), {})
    summary = runtime.run_task(client, "predict", with_id(seed, "a" * 128), {})
    assert summary["output"].endswith("a" * 128 + ".csv")
    _, metadata = runtime.run_task(client, "train", with_id(seed, "r" * 128), {"epochs": 1})
    assert metadata["training_metadata"]["num_examples"] == 100
    assert ('"model_id": "' + "r" * 128 + '"') in (root / STATE_DIR / LEDGER_NAME).read_text()


@pytest.mark.parametrize("parameter", ["output", "data"])
@pytest.mark.parametrize("length", [257, 80_000])
def test_a_long_path_parameter_is_refused_not_echoed(budget_node, seed, parameter, length):
    root, client, _ = budget_node
    message = refused(client, "predict", seed, {parameter: "d/" * (length // 2) + "x" * (length % 2)})
    assert f"parameter '{parameter}' is {length:,} characters long, at most 256 allowed" in message
    assert not (root / "d").exists()


@pytest.mark.parametrize("settings", [
    {"k" * 80_000: 1}, {"optimizer": "x" * 80_000}, {"epochs": "9" * 4000}, {"learning_rate": [[[[1]]]] * 1000},
    {"seed": {"a" * 1000: "b" * 1000}}, {"dp_noise_multiplier": "n" * 80_000},
], ids=["key", "string-value", "digits", "nested-list", "dict-value", "dp-value"])
def test_settings_keys_and_values_are_cut_in_the_error(budget_node, seed, settings):
    root, client, _ = budget_node
    message = refused(client, "train", seed, settings)
    assert "setting" in message and not (root / STATE_DIR / LEDGER_NAME).exists()


def test_an_unknown_inference_parameter_name_is_cut(budget_node, seed):
    _, client, _ = budget_node
    assert "unknown inference parameter" in refused(client, "predict", seed, {"p" * 80_000: 1})

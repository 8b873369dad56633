"""``python -m mnist_edge aggregate``: FedAvg of a model_set, and what it refuses before averaging."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mnist_edge import aggregate, model
from mnist_edge.cli import main
from mnist_edge.meta import meta_path

SHAPES = list(model.expected_shapes().values())


def write_model(directory: Path, value: float, num_examples: object = 100, **meta: object) -> Path:
    """A model directory as ``train`` leaves it: every weight ``value``, and its meta."""
    params = [np.full(shape, value, np.float32) for shape in SHAPES]
    path = model.save_pth(params, directory / "mnist.pth")
    content = {"model_kind": "mnist", "model_state": "trained", "round": 1, "model_file": "mnist.pth",
               "num_examples": num_examples, "data_fingerprint": f"sha-{value}", **meta}
    meta_path(path).write_text(json.dumps({k: v for k, v in content.items() if v is not ...}))
    return directory


@pytest.fixture
def model_set(tmp_path) -> Path:
    root = tmp_path / "models"
    write_model(root / "0b6e", 1.0, 300)
    write_model(root / "7f21", 5.0, 100, round=2)
    return root


def test_fedavg_weights_each_model_by_its_num_examples(model_set, tmp_path, capsys):
    assert main(["aggregate", str(model_set), str(tmp_path / "out.pth")]) == 0
    params = model.load_pth(tmp_path / "out.pth")
    assert all(np.allclose(p, 2.0) for p in params)  # (1 * 300 + 5 * 100) / 400, not the plain mean 3
    meta = json.loads((tmp_path / "out.xdata-meta.json").read_text())
    assert meta["num_examples"] == 400 and meta["round"] == 2 and meta["model_state"] == "aggregated"
    assert [(p["model"], p["num_examples"], p["data_fingerprint"]) for p in meta["parents"]] == [
        ("0b6e", 300, "sha-1.0"), ("7f21", 100, "sha-5.0")]
    assert "aggregated 2 models (400 examples, round 2)" in capsys.readouterr().out


def test_an_aggregated_model_is_a_member_like_any_other(model_set, tmp_path):
    """Hierarchical FedAvg: the output's num_examples is the sum, so it weighs as its parents did."""
    (tmp_path / "upper" / "agg").mkdir(parents=True)
    aggregate.aggregate(model_set, tmp_path / "upper" / "agg")  # a directory: mnist.pth inside
    write_model(tmp_path / "upper" / "other", 6.0, 400)
    aggregate.aggregate(tmp_path / "upper", tmp_path / "top.pth")
    assert all(np.allclose(p, 4.0) for p in model.load_pth(tmp_path / "top.pth"))  # (2 * 400 + 6 * 400) / 800


def test_fedavg_holds_one_model_at_a_time():
    """A generator of results is consumed lazily: the running sum never needs the whole set."""
    consumed = []

    def results():
        for value, n in ((0.0, 1), (3.0, 2)):
            consumed.append(value)
            yield [np.full(3, value, np.float32)], n

    average = aggregate.fedavg(results())
    assert consumed == [0.0, 3.0] and np.allclose(average[0], 2.0) and average[0].dtype == np.float32


def _meta_file(root: Path, name: str) -> Path:
    return root / name / "mnist.xdata-meta.json"


def _edit_meta(root: Path, name: str, **changes: object) -> Path:
    path = _meta_file(root, name)
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps({k: v for k, v in meta.items() if v is not ...}))
    return path


@pytest.mark.parametrize("change, message", [
    ({"model_kind": "cifar10"}, "'model_kind' must be \"mnist\", got \"cifar10\""),
    ({"model_kind": ...}, "'model_kind' must be \"mnist\", got null"),
    ({"num_examples": ...}, "'num_examples' must be an integer from 1 to 1,000,000,000 (no such key)"),
    ({"num_examples": 0}, "'num_examples' must be an integer from 1 to 1,000,000,000 (got 0)"),
    ({"num_examples": True}, "'num_examples' must be an integer from 1 to 1,000,000,000 (got true)"),
    ({"num_examples": "300"}, "'num_examples' must be an integer from 1 to 1,000,000,000 (got \"300\")"),
    ({"num_examples": 2**64}, "'num_examples' must be an integer from 1 to 1,000,000,000 (got 18446744073709551616)"),
    ({"round": -1}, "'round' must be an integer from 1 to 1,000,000,000 (got -1)"),
    ({"model_file": "../7f21/mnist.pth"}, "'model_file' must be a file name inside"),
])
def test_a_bad_meta_is_refused_naming_the_file_and_key(model_set, tmp_path, capsys, change, message):
    meta_file = _edit_meta(model_set, "7f21", **change)
    assert main(["aggregate", str(model_set), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {meta_file}: ") and message in err, err
    assert not (tmp_path / "out.pth").exists()


def test_a_member_of_the_wrong_shape_is_refused(model_set, tmp_path, capsys):
    state = model.parameters_to_state_dict(model.load_pth(model_set / "7f21" / "mnist.pth"))
    state["fc2.weight"] = torch.zeros(10, 64)
    torch.save(state, model_set / "7f21" / "mnist.pth")
    assert main(["aggregate", str(model_set), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert f"{model_set / '7f21' / 'mnist.pth'}: fc2.weight expected shape (10, 128), got (10, 64)" in err
    assert not (tmp_path / "out.pth").exists()


def test_a_member_with_non_finite_weights_is_refused(model_set, tmp_path, capsys):
    path = model_set / "7f21" / "mnist.pth"
    state = model.parameters_to_state_dict(model.load_pth(path))
    state["fc1.bias"][3] = float("inf")
    torch.save(state, path)
    assert main(["aggregate", str(model_set), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and ("NaN" in err or "finite" in err), err
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("arrange, message", [
    (lambda root: (root / "0b6e" / "mnist.xdata-meta.json").unlink(), "expected one *.xdata-meta.json"),
    (lambda root: (root / "0b6e" / "mnist.pth").unlink(), "mnist.pth: no such model file"),
    (lambda root: (root / "notes.txt").write_text("x"), "only model directories, found files ['notes.txt']"),
    (lambda root: None, "that is one model, not a model_set"),  # the member itself given as the set
])
def test_a_malformed_model_set_is_refused(model_set, tmp_path, capsys, arrange, message):
    arrange(model_set)
    target = model_set / "0b6e" if "one model" in message else model_set
    assert main(["aggregate", str(target), str(tmp_path / "out.pth")]) == 2
    assert message in capsys.readouterr().err


def test_an_empty_or_missing_model_set_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["aggregate", str(tmp_path / "empty"), str(tmp_path / "out.pth")]) == 2
    assert "empty model_set" in capsys.readouterr().err
    assert main(["aggregate", str(tmp_path / "absent"), str(tmp_path / "out.pth")]) == 2
    assert "no such model_set directory" in capsys.readouterr().err


def test_training_from_an_aggregated_model_is_the_next_round(model_set, tmp_path, mnist5k):
    """``round`` follows the lineage: train from fresh = 1, from a round-r model = r + 1."""
    images, labels = mnist5k
    from mnist_edge import data

    shard = data.write_shard(tmp_path / "shard.csv", images[:64], labels[:64])
    aggregate.aggregate(model_set, tmp_path / "global.pth")  # round 2 (its highest parent)
    for init, expected in ((None, 1), (tmp_path / "global.pth", 3)):
        out = tmp_path / f"from-{expected}.pth"
        args = ["train", "--model", str(out), *(["--init", str(init)] if init else []), str(shard)]
        assert main(args) == 0
        assert json.loads(meta_path(out).read_text())["round"] == expected


def test_the_output_meta_is_all_of_this_and_names_each_parent_by_its_hash(model_set, tmp_path):
    """A member meta without ``round`` or ``model_file`` counts as round 1 with ``mnist.pth``; a
    fingerprint that is not a string is recorded as null."""
    write_model(model_set / "a3c0", 2.0, 50, round=..., model_file=..., data_fingerprint=7)
    target, meta = aggregate.aggregate(model_set, tmp_path / "out.pth")
    assert meta_text(target) == json.dumps(meta, indent=2) + "\n"
    created = meta.pop("created_at")
    assert created.endswith("+00:00") and len(created) == len("2026-01-01T00:00:00+00:00")
    assert meta == {
        "model_kind": "mnist", "model_state": "aggregated", "round": 2, "model_file": "out.pth",
        "aggregation": "fedavg", "num_examples": 450,
        "parents": [{"model": name, "model_sha256": sha256_of(model_set / name / "mnist.pth"),
                     "data_fingerprint": fingerprint, "num_examples": n, "round": r}
                    for name, fingerprint, n, r in (("0b6e", "sha-1.0", 300, 1), ("7f21", "sha-5.0", 100, 2),
                                                    ("a3c0", None, 50, 1))],
    }


def meta_text(target: Path) -> str:
    return meta_path(target).read_text(encoding="utf-8")


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("model_file", ["", ".", ".."])
def test_a_model_file_that_names_no_file_is_refused(model_set, tmp_path, capsys, model_file):
    meta_file = _edit_meta(model_set, "7f21", model_file=model_file)
    assert main(["aggregate", str(model_set), str(tmp_path / "out.pth")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {meta_file}: 'model_file' must be a file name inside "
                                               f"{model_set / '7f21'}, got {json.dumps(model_file)}")


def test_a_member_with_many_metas_lists_the_first_five(model_set, tmp_path, capsys):
    for k in range(6):
        (model_set / "7f21" / f"copy{k}.xdata-meta.json").write_text("{}")
    assert main(["aggregate", str(model_set), str(tmp_path / "out.pth")]) == 2
    names = sorted(p.name for p in (model_set / "7f21").glob("*.xdata-meta.json"))[:5]
    assert capsys.readouterr().err.strip() == (f"error: {model_set / '7f21'}: expected one *.xdata-meta.json "
                                               f"beside the model, found {names}")


def test_fedavg_sums_in_float64_and_needs_lists_of_one_length():
    """2**24 + 1 is not a float32: a float32 running sum would give 0.99999988 here, not 0.99999994."""
    average = aggregate.fedavg([([np.ones(1, np.float32)], 2**24 + 1), ([np.zeros(1, np.float32)], 1)])
    assert average[0].dtype == np.float32 and average[0][0] == np.float32((2**24 + 1) / (2**24 + 2))
    with pytest.raises(ValueError):
        aggregate.fedavg([([np.ones(1)], 1), ([np.ones(1), np.ones(1)], 1)])
    with pytest.raises(ValueError, match="^fedavg: no models to average$"):
        aggregate.fedavg([])


def test_the_command_line_says_what_it_takes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "FedAvg a directory of trained models (weighted by num_examples)" in text
    with pytest.raises(SystemExit):
        main(["aggregate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "aggregate [-h] MODEL_SET_DIR OUT.pth" in text
    assert "MODEL_SET_DIR a directory of model directories, each with mnist.pth and mnist.xdata-meta.json" in text
    assert "OUT.pth model file to write, or a directory (mnist.pth inside)" in text


def test_hidden_entries_of_a_model_set_are_not_members(model_set, tmp_path):
    """A desktop's ``.DS_Store`` or a notebook's ``.ipynb_checkpoints`` beside the models changes nothing:
    hidden entries are not members and not stray files."""
    (model_set / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (model_set / ".ipynb_checkpoints").mkdir()
    _, meta = aggregate.aggregate(model_set, tmp_path / "out.pth")
    assert [p["model"] for p in meta["parents"]] == ["0b6e", "7f21"]


@pytest.mark.parametrize(
    "arrange, found",
    [
        (
            lambda root: [(root / f"{c}.txt").write_text("x") for c in "fedcba"],
            "['a.txt', 'b.txt', 'c.txt', 'd.txt', 'e.txt']",
        ),  # the first five in name order, no hint
        (lambda root: None, "['mnist.pth', 'mnist.xdata-meta.json'] (that is one model, not a model_set)"),
    ],
)
def test_stray_files_are_refused_with_the_whole_message(model_set, tmp_path, arrange, found):
    """The whole message: the first five stray files, and the hint only when a meta among them says the set
    is one model."""
    arrange(model_set)
    target = model_set / "0b6e" if "one model" in found else model_set
    with pytest.raises(aggregate.ModelSetError) as error:
        aggregate.aggregate(target, tmp_path / "out.pth")
    assert str(error.value) == f"{target}: expected only model directories, found files {found}"


def test_the_command_list_describes_aggregate_in_its_own_words(capsys):
    """The ``--help`` listing gives exactly this line for the command, nothing around it."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"(^| )aggregate FedAvg a directory of trained models \(weighted by num_examples\)( |$)", text), (
        text
    )

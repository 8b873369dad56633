"""Every input that used to end in a bare traceback now gets one clear line (the CLI: exit 2).

The callbacks through a real ``EdgeClient`` (in-process runtime), and ``python -m mnist_edge``
commands through ``cli.main``: each case names the file, key or value and what was expected.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scaleout import ScaleoutModel
from scaleoututil.helpers.plugins.numpyhelper import Helper

from hostile import node, scaleout_model, seed_params
from mnist_edge import cli, data, model
from mnist_edge.model import ModelFileError
from mnist_edge.settings import SettingsError


class Verbatim(Helper):
    """Builds a ScaleoutModel around exact npz bytes, as a hostile server could send them."""

    def __init__(self, blob: bytes) -> None:
        super().__init__()
        self.blob = blob

    def save(self, weights, path=None, file_type="npz"):
        path.write(self.blob)
        return path


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture
def edge_node(node_dir, tmp_path):
    return node(node_dir, workdir=tmp_path / "work")


def seed_arrays(seed_path) -> dict[str, np.ndarray]:
    return {str(i): p for i, p in enumerate(seed_params(seed_path))}


MALFORMED = {
    "missing-key": (lambda s: npz_bytes({k: v for k, v in s.items() if k != "5"}),
                    r"expected 8 parameter arrays for the MNIST CNN, got 7|expected arrays named 0..7"),
    "object-array": (lambda s: npz_bytes(s | {"2": np.array([object()], dtype=object)}),
                     r"array 2 \(conv2.weight\) is object, expected plain numbers"),
    "single-npy": (lambda s: (lambda b: (np.save(b, s["0"]), b.getvalue())[1])(io.BytesIO()),
                   r"not a numpy .npz parameter file without pickles \(File is not a zip file\)"),
    "empty": (lambda s: b"", r"not a numpy .npz parameter file without pickles"),
    "truncated": (lambda s: npz_bytes(s)[:-3000], r"not a numpy .npz parameter file without pickles"),
    "complex": (lambda s: npz_bytes(s | {"1": s["1"].astype(np.complex64)}), r"array 1 \(conv1.bias\) is complex64"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_incoming_model_fails_the_task_with_its_reason(edge_node, seed_path, case):
    build, message = MALFORMED[case]
    incoming = ScaleoutModel.from_training_model([], Verbatim(build(seed_arrays(seed_path))))
    with pytest.raises(ModelFileError, match=message):
        edge_node.run("train", incoming, {})
    with pytest.raises(ModelFileError, match=message):
        edge_node.run("validate", incoming)
    assert edge_node.runtime.attributes[-1]["validation_error"].startswith(f"model {incoming.model_id}: ")


def test_client_settings_that_are_not_a_mapping_fail_the_round(edge_node, seed_path):
    with pytest.raises(SettingsError, match="client_settings must be a mapping .* got list"):
        edge_node.run("train", scaleout_model(seed_params(seed_path)), ["epochs", 1])


def test_a_data_dir_that_is_a_file_fails_every_task_saying_so(tmp_path, seed_path, monkeypatch):
    (tmp_path / "data").write_text("oops")
    edge_node = node(tmp_path / "data", workdir=tmp_path / "work")
    with pytest.raises(data.DataError, match="data: is a file, expected the node's data directory"):
        edge_node.run("train", scaleout_model(seed_params(seed_path)), {})


# -- the command line ----------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path, seed_path, mnist5k):
    images, labels = mnist5k
    data.write_shard(tmp_path / "s.csv", images[:20], labels[:20])
    state = model.parameters_to_state_dict(seed_params(seed_path))
    torch.save(state | {"fc1.weight": state["fc1.weight"].to("meta")}, tmp_path / "meta.pth")
    torch.save(state | {"fc2.bias": state["fc2.bias"].to_sparse()}, tmp_path / "sparse.pth")
    with warnings.catch_warnings():  # quantized tensors are deprecated, and still loadable: the case stands
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_tensor(state["fc2.bias"], 0.1, 0, torch.qint8)
    torch.save(state | {"fc2.bias": quantized}, tmp_path / "quantized.pth")
    (tmp_path / "adir").mkdir()
    return tmp_path


CLI_CASES = [
    (["predict", "--model", "meta.pth", "s.csv", "r.csv"], "meta.pth: fc1.weight is a meta tensor"),
    (["predict", "--model", "sparse.pth", "s.csv", "r.csv"], "sparse.pth: fc2.bias is a torch.sparse_coo tensor"),
    (["predict", "--model", "quantized.pth", "s.csv", "r.csv"], "quantized.pth: fc2.bias is a quantized tensor"),
    (["predict", "--model", "/dev/full", "s.csv", "r.csv"], "/dev/full: is not a regular file"),
    (["predict", "--model", "adir", "s.csv", "r.csv"], "adir: is a directory, expected a model file"),
    (["train", "--model", "/dev/full", "s.csv"], "/dev/full: exists and is not a regular file"),
    (["export", "SEED", "/dev/full"], "/dev/full: exists and is not a regular file"),
    (["predict", "--model", "SEED", "s.csv", "/dev/full"], "/dev/full: exists and is not a regular file"),
    (["predict", "--model", "SEED", "s.csv", "s.csv"], "RESULT s.csv would replace input data"),
    (["train", "--model", "m.pth", "--seed", "-1", "s.csv"], "setting 'seed' must be an integer from 0 to 2**63-1"),
    (["train", "--model", "m.pth", "--learning-rate", "1e39", "s.csv"], "setting 'learning_rate' must be a number > 0"),
    (["prepare", "--clients", "2", "--out", "out", "--seed", "-1"], "--seed must be an integer from 0 to 2**63-1"),
    (["simulate", "--data", "out", "--rounds", "1", "--out", "run", "--seed", "-1"],
     "--seed must be an integer from 0 to 2**63-1"),
]


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
@pytest.mark.parametrize("args,message", CLI_CASES, ids=[" ".join(a[:3]) for a, _ in CLI_CASES])
def test_the_cli_exits_2_with_one_line(files, seed_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(files)
    args = [str(seed_path) if a == "SEED" else a for a in args]
    before = (files / "s.csv").read_bytes()
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert (files / "s.csv").read_bytes() == before


def idx(array: np.ndarray, ndim: int | None = None) -> bytes:
    shape = array.shape
    header = bytes([0, 0, 0x08, ndim if ndim is not None else array.ndim])
    return header + b"".join(int(d).to_bytes(4, "big") for d in shape) + array.astype(np.uint8).tobytes()


def idx_pair(folder: Path, images: bytes, labels: bytes) -> Path:
    (folder / "train-images-idx3-ubyte").write_bytes(images)
    (folder / "train-labels-idx1-ubyte").write_bytes(labels)
    return folder


def keras(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x_train=x, y_train=y, x_test=x[:0], y_test=y[:0])
    return path


SOURCES = {
    "negative-labels": (lambda d, x, y: keras(d / "m.npz", x, y.astype(np.int64) - 5), "labels must be integers 0-9"),
    "labels-200": (lambda d, x, y: keras(d / "m.npz", x, np.full(len(y), 200)), "labels must be integers 0-9, got"),
    "one-hot": (lambda d, x, y: keras(d / "m.npz", x, np.eye(10)[y]), "(one-hot labels? expected one integer"),
    "y-longer": (lambda d, x, y: keras(d / "m.npz", x[:10], y[:12]), "10 images but 12 labels"),
    "y-shorter": (lambda d, x, y: keras(d / "m.npz", x[:12], y[:10]), "12 images but 10 labels"),
    "floats-over-255": (lambda d, x, y: keras(d / "m.npz", x.astype(np.float32) * 2, y),
                        "image values must be 0-255 (or 0-1 floats)"),
    "idx-ndim-255": (lambda d, x, y: idx_pair(d, idx(x[:2], 255), idx(y[:2])),
                     "IDX file has 255 dimensions, expected 1 (labels) or 3 (images)"),
}


@pytest.mark.parametrize("case", SOURCES, ids=list(SOURCES))
def test_a_bad_prepare_source_exits_2_naming_the_problem(tmp_path, mnist5k, capsys, case):
    images, labels = mnist5k
    build, message = SOURCES[case]
    folder = tmp_path / "src"
    folder.mkdir()
    source = build(folder, images[:100], labels[:100])
    assert cli.main(["prepare", "--source", str(source), "--clients", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_float_sources_in_0_1_are_scaled_not_rounded_to_0_or_1(tmp_path, mnist5k):
    from mnist_edge.prepare import load_source

    images, labels = mnist5k
    source = keras(tmp_path / "m.npz", images[:50].astype(np.float32) / 255, labels[:50])
    got, _ = load_source(str(source))
    np.testing.assert_array_equal(got, images[:50])


def test_the_cli_bad_zip_case_is_a_model_error(tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "odd.npz", "w") as archive:
        archive.writestr("0.npy", b"not an array")
    assert cli.main(["export", str(tmp_path / "odd.npz"), str(tmp_path / "x.pth")]) == 2
    assert "odd.npz" in capsys.readouterr().err

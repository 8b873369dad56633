"""Model files and state_dicts refused, each with its whole message: the message is the interface.

The loaders meet files a data platform or a server hands over; each refusal names the file (or
the source), the array and what was expected, and these tests hold every word of it.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch

from hostile import Evil
from mnist_edge import model
from mnist_edge.model import ModelFileError


def good_state(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in model.new_model(0).state_dict().items()}


def changed(**entries) -> dict:
    state = good_state()
    for name, value in entries.items():
        name = name.replace("__", ".")
        if value is None:
            del state[name]
        else:
            state[name] = value
    return state


def quantized(tensor: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # torch deprecates creating them; files can still hold them
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(tensor, 0.1, 0, torch.qint8)


SHAPES = model.expected_shapes()
ALL_NAMES = list(SHAPES)


@pytest.mark.parametrize(
    "state, message",
    [
        ([1, 2], "m.pth: expected a state_dict (a dict of tensors), got list"),
        (
            {"model_state_dict": {}, "epoch": 3},
            f"m.pth: state_dict does not match the MNIST CNN; missing {ALL_NAMES}; "
            "unexpected ['model_state_dict', 'epoch']",
        ),
        (changed(fc2__bias=None), "m.pth: state_dict does not match the MNIST CNN; missing ['fc2.bias']"),
        (
            good_state() | {f"extra{i}": torch.zeros(1) for i in range(7)},
            "m.pth: state_dict does not match the MNIST CNN; "
            "unexpected ['extra0', 'extra1', 'extra2', 'extra3', 'extra4']",
        ),
        (changed(fc1__bias=[0.0] * 128), "m.pth: fc1.bias is a list, expected a tensor"),
        (
            changed(fc1__bias=torch.empty(128, device="meta")),
            "m.pth: fc1.bias is a meta tensor, expected a dense tensor of real numbers",
        ),
        (
            changed(fc1__bias=quantized(torch.zeros(128))),
            "m.pth: fc1.bias is a quantized tensor, expected a dense tensor of real numbers",
        ),
        (
            changed(fc1__bias=torch.zeros(128).to_sparse()),
            "m.pth: fc1.bias is a torch.sparse_coo tensor, expected a dense tensor of real numbers",
        ),
        (
            changed(fc1__bias=torch.zeros(128, dtype=torch.complex64)),
            "m.pth: fc1.bias is torch.complex64, expected real numbers (float32)",
        ),
        (
            changed(fc1__bias=torch.zeros(128, dtype=torch.bool)),
            "m.pth: fc1.bias is torch.bool, expected real numbers (float32)",
        ),
        (changed(fc2__bias=torch.zeros(5)), "m.pth: fc2.bias expected shape (10,), got (5,)"),
        (
            changed(fc2__bias=torch.full((10,), float("nan"))),
            "m.pth: array 7 (fc2.bias) holds 10 non-finite values (NaN or infinity), expected finite weights",
        ),
    ],
)
def test_a_state_dict_that_is_not_this_cnn_is_refused_saying_why(state, message):
    with pytest.raises(ModelFileError) as error:
        model.state_dict_to_parameters(state, "m.pth")
    assert str(error.value) == message


def test_a_state_dict_error_names_a_default_source():
    with pytest.raises(ModelFileError, match=r"^state_dict: expected a state_dict"):
        model.state_dict_to_parameters("not a dict")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_a_state_dict_of_any_real_dtype_becomes_float32_parameters(dtype):
    state = good_state(dtype)
    params = model.state_dict_to_parameters(state)
    assert [p.shape for p in params] == list(SHAPES.values())
    assert all(p.dtype == np.float32 for p in params)
    for p, t in zip(params, state.values()):
        np.testing.assert_array_equal(p, t.float().numpy())


# -- .npz parameter files ---------------------------------------------------------------------------


def params(dtype=np.float32) -> list[np.ndarray]:
    return [p.astype(dtype) for p in model.get_parameters(model.new_model(0))]


def npz_of(path, arrays: dict[str, np.ndarray], version=None) -> str:
    """A zip of .npy members written by numpy itself (``version`` picks the .npy format)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            with archive.open(name, "w") as member:
                np.lib.format.write_array(member, array, version=version, allow_pickle=False)
    return str(path)


def members(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{i}.npy": a for i, a in enumerate(arrays)}


@pytest.mark.parametrize(
    "arrays, message",
    [
        (members(params()[:7]), "expected 8 parameter arrays for the MNIST CNN, got 7"),
        ({"w.npy": np.zeros(3)}, "expected arrays named 0..7, got 'w.npy'"),
        ({}, "expected 8 parameter arrays for the MNIST CNN, got 0"),
        (
            {f"{'n' * 45}{i}.npy": np.zeros(1) for i in range(11)},
            "expected arrays named 0..7, got " + ", ".join([repr("n" * 40)] * 10),
        ),
        (
            members(params()[:7] + [np.zeros(10, np.complex64)]),
            "array 7 (fc2.bias) is complex64, expected plain numbers",
        ),
        (
            members(params()[:7] + [np.zeros(10, np.longdouble)]),
            "array 7 (fc2.bias) is float128, expected real numbers (float32)",
        ),
        (members(params()[:7] + [np.zeros(5, np.float32)]), "array 7 (fc2.bias) expected shape (10,), got (5,)"),
        (
            members(params()[:7] + [np.full(10, np.inf, np.float32)]),
            "array 7 (fc2.bias) holds 10 non-finite values (NaN or infinity), expected finite weights",
        ),
    ],
)
def test_an_npz_that_is_not_this_cnn_is_refused_naming_the_file_and_array(tmp_path, arrays, message):
    path = npz_of(tmp_path / "m.npz", arrays)
    with pytest.raises(ModelFileError) as error:
        model.load_npz(path)
    assert str(error.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda blob: b"\x93NUMPY\x03\x00" + blob[8:], ".npy format version (3, 0), expected 1.0 or 2.0"),
        (lambda blob: blob[:-8], "truncated (248 of 256 bytes)"),  # 2 of its 64 floats missing
    ],
)
def test_an_npz_member_of_an_unknown_format_version_or_cut_short_is_refused(tmp_path, change, message):
    with zipfile.ZipFile(npz_of(tmp_path / "m.npz", members(params()))) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    contents["3.npy"] = change(contents["3.npy"])
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as archive:
        for name, blob in contents.items():
            archive.writestr(name, blob)
    with pytest.raises(ModelFileError) as error:
        model.load_npz(tmp_path / "bad.npz")
    assert str(error.value) == f"{tmp_path / 'bad.npz'}: array 3 (conv2.bias): {message}"


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_an_npz_of_float64_fortran_order_arrays_loads_as_the_same_float32_weights(tmp_path, version):
    """Format 1.0 and 2.0, float64, column-major members: the same weights, as writable float32 arrays."""
    original = params()
    arrays = members([np.asfortranarray(p.astype(np.float64)) for p in original])
    loaded = model.load_npz(npz_of(tmp_path / "m.npz", arrays, version))
    for got, want in zip(loaded, original):
        assert got.dtype == np.float32 and got.flags.writeable
        np.testing.assert_array_equal(got, want)


def test_a_saved_npz_is_a_compressed_float32_zip_with_fixed_stamps(tmp_path):
    """What makes two saves byte-identical and the file small: checked on the zip's own entries."""
    path = model.save_npz(params(np.float64), tmp_path / "m.npz")
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        assert [i.filename for i in infos] == [f"{i}.npy" for i in range(8)]
        assert {(i.compress_type, i.date_time, i.external_attr) for i in infos} == {
            (zipfile.ZIP_DEFLATED, (1980, 1, 1, 0, 0, 0), 0o644 << 16)
        }
        with archive.open("4.npy") as member:
            assert np.lib.format.read_array(member).dtype == np.float32
    assert path.stat().st_size < 0.95 * 4 * model.PARAMETER_COUNT


@pytest.mark.parametrize("save", [model.save_npz, model.save_pth])
def test_saving_non_finite_weights_is_refused_naming_the_target(tmp_path, save):
    bad = params()
    bad[0][0, 0, 0, 0] = np.nan
    with pytest.raises(ModelFileError) as error:
        save(bad, tmp_path / "out")
    assert str(error.value) == (
        f"{tmp_path / 'out'}: array 0 (conv1.weight) holds 1 non-finite values (NaN or "
        "infinity), expected finite weights"
    )
    assert not (tmp_path / "out").exists()


def test_parameter_errors_name_a_default_source():
    for convert in (model.parameters_to_state_dict, lambda p: model.set_parameters(model.Net(), p)):
        with pytest.raises(ModelFileError, match=r"^parameters: expected 8 parameter arrays"):
            convert(params()[:3])


def test_a_state_dict_from_float64_parameters_holds_float32_tensors(tmp_path):
    state = model.parameters_to_state_dict(params(np.float64))
    assert {t.dtype for t in state.values()} == {torch.float32}
    torch.save(state, tmp_path / "m.pth")
    model.save_pth(params(np.float64), tmp_path / "saved.pth")
    for name in ("m.pth", "saved.pth"):
        loaded = torch.load(tmp_path / name, weights_only=True)
        assert {t.dtype for t in loaded.values()} == {torch.float32}


# -- telling the kinds apart; .pth files -----------------------------------------------------------


def test_the_kind_comes_from_the_entries_and_each_loads_its_own(tmp_path):
    npz_path = model.save_npz(params(), tmp_path / "weights.pth")  # names mislead on purpose
    pth_path = model.save_pth(params(), tmp_path / "weights.npz")
    assert (model.model_file_kind(npz_path), model.model_file_kind(pth_path)) == ("npz", "pth")
    for path in (npz_path, pth_path):
        np.testing.assert_array_equal(model.load_model_file(path)[7], params()[7])
    with pytest.raises(ModelFileError) as error:
        model.load_pth(npz_path)
    assert str(error.value) == f"{npz_path}: is a numpy .npz parameter file, expected a PyTorch .pth state_dict"
    with zipfile.ZipFile(tmp_path / "nested.zip", "w") as archive:  # torch.save's layout: <name>/data.pkl
        archive.writestr("archive/data.pkl", b"")
    assert model.model_file_kind(tmp_path / "nested.zip") == "pth"


@pytest.mark.parametrize(
    "entries, message",
    [
        (
            ["a.txt", "b.txt", "c.txt", "d.txt", "e.txt"],
            "a zip archive but not a model file, {expected} (entries ['a.txt', 'b.txt', 'c.txt', 'd.txt'])",
        ),
        (["0.npy", "notes.txt"], "a zip archive but not a model file, {expected} (entries ['0.npy', 'notes.txt'])"),
        (["mydata.pkl"], "a zip archive but not a model file, {expected} (entries ['mydata.pkl'])"),
    ],
)
def test_a_zip_that_is_neither_kind_is_refused_listing_its_entries(tmp_path, entries, message):
    path = tmp_path / "m.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name in entries:
            archive.writestr(name, b"x")
    with pytest.raises(ModelFileError) as error:
        model.model_file_kind(path)
    assert str(error.value) == f"{path}: " + message.format(expected=model._NOT_A_MODEL)


def test_a_zip_declaring_more_than_a_model_can_need_is_refused_unread(tmp_path):
    """Exactly the limit is still a model file; one byte more is refused from the zip's directory."""
    for size, refused in ((model.MAX_MODEL_BYTES, False), (model.MAX_MODEL_BYTES + 1, True)):
        path = tmp_path / f"{size}.npz"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("0.npy", bytes(size))
        if not refused:
            assert model.model_file_kind(path) == "npz"
            continue
        with pytest.raises(ModelFileError) as error:
            model.model_file_kind(path)
        assert str(error.value) == (
            f"{path}: declares {size:,} bytes of contents, more than the "
            f"{model.MAX_MODEL_BYTES:,} a model of this CNN can need"
        )


@pytest.mark.parametrize("force_no_weights_only", [False, True])
def test_a_pth_that_needs_more_than_weights_is_refused_without_running_it(tmp_path, monkeypatch, force_no_weights_only):
    """Refused, and the pickle never runs, even where ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns
    torch's default off: the node's own ``weights_only=True`` holds whatever the environment says.
    """
    if force_no_weights_only:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "executed"
    torch.save({"conv1.weight": Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ModelFileError) as error:
        model.load_model_file(tmp_path / "evil.pth")
    assert str(error.value).startswith(
        f"{tmp_path / 'evil.pth'}: not a state_dict that loads with weights_only=True (Weights only load failed."
    )
    assert "\n" not in str(error.value) and not marker.exists()


@pytest.mark.parametrize(
    "kind, message",
    [
        ("directory", "is a directory, expected a model file (.npz or .pth)"),
        ("fifo", "is not a regular file (a device, FIFO or socket), expected a model file"),
        ("missing", "no such model file"),
        ("pickle", f"not a model file, {model._NOT_A_MODEL} (File is not a zip file)"),
    ],
)
def test_what_is_not_a_model_file_is_refused_before_reading(tmp_path, kind, message):
    path = tmp_path / "m.npz"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"weights": [1, 2]}))
    for load in (model.load_model_file, model.load_npz) if kind != "pickle" else (model.load_model_file,):
        with pytest.raises(ModelFileError) as error:
            load(path)
        assert str(error.value) == f"{path}: {message}"


def test_an_unreadable_model_file_says_why(tmp_path, monkeypatch):
    path = model.save_npz(params(), tmp_path / "m.npz")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(ModelFileError) as error:
        model.load_npz(path)
    assert str(error.value) == f"{path}: cannot read model file (Permission denied)"


def signaling_nan(count: int) -> np.ndarray:
    """float64 signaling NaNs: casting them to float32 raises the FPU's 'invalid' flag."""
    return np.full(count, 0x7FF0000000000001, np.uint64).view(np.float64)


@pytest.mark.parametrize(
    "last, message",
    [
        (
            np.full(10, 1e300),
            "array 7 (fc2.bias) overflows float32 (largest magnitude 1e+300, float32 holds up to 3.4e+38)",
        ),
        (
            np.array([0.5] * 9 + [-1e39]),
            "array 7 (fc2.bias) overflows float32 (largest magnitude 1e+39, float32 holds up to 3.4e+38)",
        ),
        (signaling_nan(10), "array 7 (fc2.bias) holds 10 non-finite values (NaN or infinity), expected finite weights"),
    ],
)
def test_float64_weights_that_float32_cannot_hold_are_refused_with_one_clean_error(tmp_path, last, message):
    """Finite float64 values past float32's range would become infinity: refused, saying the largest magnitude;
    NaN or infinity is refused as non-finite; and the check itself emits no numpy RuntimeWarning on the way
    (warnings are errors here), so a node's log holds the one clean error and nothing else.
    """
    path = npz_of(tmp_path / "m.npz", members([p.astype(np.float64) for p in params()[:7]] + [last]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ModelFileError) as error:
            model.load_npz(path)
    assert str(error.value) == f"{path}: {message}"


def test_an_npz_member_is_read_only_as_far_as_its_header_declares(tmp_path):
    """Bytes after a member's declared data are never read (a member cannot make the node read more than its
    header declares), and the weights load as written."""
    original = params()
    with zipfile.ZipFile(tmp_path / "m.npz", "w") as archive:
        for name, array in members(original).items():
            with archive.open(name, "w") as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
                member.write(b"\0" * 4096)  # trailing bytes no header accounts for
    for got, want in zip(model.load_npz(tmp_path / "m.npz"), original):
        np.testing.assert_array_equal(got, want)


def test_a_zip_with_data_pkl_at_its_root_is_a_pth(tmp_path):
    """``data.pkl`` itself (not only ``<name>/data.pkl``), spelled exactly so, marks a torch file."""
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as archive:
        archive.writestr("data.pkl", b"")
    assert model.model_file_kind(tmp_path / "m.zip") == "pth"


def _rewritten_pth(tmp_path, change) -> str:
    """A real ``torch.save`` file of the CNN with its ``data.pkl`` replaced by ``change(data.pkl)``."""
    model.save_pth(params(), tmp_path / "real.pth")
    with zipfile.ZipFile(tmp_path / "real.pth") as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    path = tmp_path / "m.pth"
    with zipfile.ZipFile(path, "w") as archive:
        for name, blob in contents.items():
            archive.writestr(name, change(blob) if name.endswith("/data.pkl") else blob)
    return str(path)


def test_a_pth_from_a_gpu_node_loads_on_the_cpu(tmp_path):
    """``torch.save`` of CUDA tensors tags each storage ``cuda:0``; the CPU-only node loads them onto the CPU,
    the same weights."""
    path = _rewritten_pth(tmp_path, lambda pkl: pkl.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"))
    for got, want in zip(model.load_pth(path), params()):
        np.testing.assert_array_equal(got, want)


def test_a_pth_whose_error_has_no_text_is_named_by_the_error_type(tmp_path):
    """An empty ``data.pkl`` makes torch's restricted unpickler raise a bare ``EOFError()``: the refusal then
    names the error's type, since it has no text to quote."""
    path = _rewritten_pth(tmp_path, lambda pkl: b"")
    with pytest.raises(ModelFileError) as error:
        model.load_pth(path)
    assert str(error.value) == f"{path}: not a state_dict that loads with weights_only=True (EOFError)"


DROP_CACHES = "/proc/sys/vm/drop_caches"  # a regular file that only root may write and nobody may read


@pytest.mark.skipif(not os.path.isfile(DROP_CACHES), reason="needs Linux /proc/sys")
def test_a_model_file_the_node_may_not_open_says_why():
    """A real EACCES from open(), even as root: the message names the file and the OS's reason, nothing else."""
    with pytest.raises(ModelFileError) as error:
        model.load_npz(DROP_CACHES)
    assert str(error.value) == f"{DROP_CACHES}: cannot read model file (Permission denied)"

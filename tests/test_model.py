"""The CNN and its parameter list: architecture, round trips, shape checks, byte-stable files."""

from __future__ import annotations

import io
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnist_edge import model, npz
from mnist_edge.model import ModelFileError
from mnist_edge.net import Dropout, dropout, random_bytes_like


def test_architecture_matches_the_pytorch_example():
    net = model.Net()
    assert sum(p.numel() for p in net.parameters()) == model.PARAMETER_COUNT == 1_199_882
    assert list(model.expected_shapes().items()) == [
        ("conv1.weight", (32, 1, 3, 3)), ("conv1.bias", (32,)),
        ("conv2.weight", (64, 32, 3, 3)), ("conv2.bias", (64,)),
        ("fc1.weight", (128, 9216)), ("fc1.bias", (128,)),
        ("fc2.weight", (10, 128)), ("fc2.bias", (10,)),
    ]
    out = net.eval()(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2))  # log_softmax


def test_parameters_round_trip_through_a_fresh_module():
    source = model.new_model(seed=3)
    params = model.get_parameters(source)
    assert len(params) == 8 and all(p.dtype == np.float32 for p in params)
    target = model.new_model(seed=4)
    model.set_parameters(target, params)
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_same_seed_same_weights_and_rng_state_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = model.get_parameters(model.new_model(7)), model.get_parameters(model.new_model(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert torch.rand(1) == expected_next


def test_wrong_count_or_shape_fails_with_expected_vs_got():
    params = model.get_parameters(model.Net())
    with pytest.raises(ModelFileError, match="expected 8 parameter arrays for the MNIST CNN, got 7"):
        model.set_parameters(model.Net(), params[:7])
    params[4] = np.zeros((64, 9216), dtype=np.float32)
    with pytest.raises(ModelFileError, match=r"array 4 \(fc1.weight\) expected shape \(128, 9216\), got \(64, 9216\)"):
        model.set_parameters(model.Net(), params, source="model abc")


def test_npz_is_byte_identical_and_loads_with_numpyhelper(tmp_path):
    from scaleoututil.helpers.helpers import get_helper

    params = model.get_parameters(model.new_model(0))
    first = model.save_npz(params, tmp_path / "a.npz").read_bytes()
    second = model.save_npz(params, tmp_path / "b.npz").read_bytes()
    assert first == second
    loaded = get_helper("numpyhelper").load(str(tmp_path / "a.npz"))
    assert all(np.array_equal(x, y) for x, y in zip(loaded, params))
    assert all(np.array_equal(x, y) for x, y in zip(model.load_npz(tmp_path / "a.npz"), params))


def test_load_npz_rejects_pickles_and_foreign_files(tmp_path):
    import pickle

    disguised = tmp_path / "model.npz"
    disguised.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ModelFileError, match="not a numpy .npz parameter file without pickles"):
        model.load_npz(disguised)
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(ModelFileError, match="expected arrays named 0..7"):
        model.load_npz(tmp_path / "other.npz")
    with pytest.raises(ModelFileError, match="no such model file"):
        model.load_npz(tmp_path / "missing.npz")


def test_an_array_is_refused_past_a_byte_limit_before_it_is_read(tmp_path):
    """``npz.byte_limit``: exactly the limit is read, one byte more is refused naming the member."""
    path = tmp_path / "a.npz"
    np.savez(path, x=np.zeros((10, 10), np.float32))
    with zipfile.ZipFile(path) as archive:
        array = npz.read_member(archive, "x.npy", "x", npz.byte_limit(400, "a.npz: x"))
        assert array.shape == (10, 10)
        with pytest.raises(npz.ArrayError) as error:
            npz.read_member(archive, "x.npy", "x", npz.byte_limit(399, "a.npz: x"))
    assert str(error.value) == ("a.npz: x declares shape (10, 10) of float32 (400 bytes), more than the "
                                "limit of 399 bytes")


def example_forward(net: model.Net, x: torch.Tensor) -> torch.Tensor:
    """pytorch/examples' forward pass, step by step (ReLU before the max-pool), on ``net``'s layers."""
    x = F.relu(net.conv1(x))
    x = F.max_pool2d(F.relu(net.conv2(x)), 2)
    x = F.dropout(x, net.dropout1.p, net.training)
    x = F.relu(net.fc1(torch.flatten(x, 1)))
    x = F.dropout(x, net.dropout2.p, net.training)
    return F.log_softmax(net.fc2(x), dim=1)


def test_forward_and_gradients_are_bit_identical_to_the_examples_order(mnist5k):
    """Net pools before its ReLU (cheaper); outputs and every gradient must be the example's, bit for bit."""
    images, labels = mnist5k
    x = images[::79][:64].astype(np.float32)[:, None] / 255  # real digits, all ten classes
    x, y = torch.from_numpy((x - 0.1307) / 0.3081), torch.from_numpy(labels[::79][:64].astype(np.int64))
    ours, theirs = model.new_model(0).eval(), model.new_model(0).eval()  # eval: no dropout
    out_ours, out_theirs = ours(x), example_forward(theirs, x)
    assert torch.equal(out_ours, out_theirs)
    F.nll_loss(out_ours, y).backward()
    F.nll_loss(out_theirs, y).backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_dropout_keeps_each_element_with_probability_1_minus_p_scaled_up():
    ones = torch.ones(256, 4096)
    for p in (0.25, 0.5):
        out = dropout(ones, p, torch.Generator().manual_seed(0))
        kept = out != 0
        share, sigma = kept.double().mean().item(), (p * (1 - p) / ones.numel()) ** 0.5
        assert abs(share - (1 - p)) < 5 * sigma, (p, share)
        assert torch.all(out[kept] == 1 / (1 - p))
        per_row = kept.double().mean(1)  # no structure: each row and column near 1 - p as well
        assert per_row.min() > 1 - p - 0.05 and per_row.max() < 1 - p + 0.05
    with pytest.raises(ValueError, match="multiple of 1/256"):
        dropout(ones, 0.3)


def test_dropout_masks_follow_the_generator_and_the_memory_layout():
    x = torch.ones(8, 64, 12, 12).contiguous(memory_format=torch.channels_last)
    first = dropout(x, 0.25, torch.Generator().manual_seed(1))
    again = dropout(x, 0.25, torch.Generator().manual_seed(1))
    other = dropout(x, 0.25, torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.is_contiguous(memory_format=torch.channels_last)
    net = model.new_model(0)
    inputs = torch.rand(4, 1, 28, 28)
    assert torch.equal(net.eval()(inputs, torch.Generator().manual_seed(1)), net(inputs))  # eval: no dropout
    net.train()
    assert torch.equal(net(inputs, torch.Generator().manual_seed(1)), net(inputs, torch.Generator().manual_seed(1)))
    assert not torch.equal(net(inputs, torch.Generator().manual_seed(1)), net(inputs, torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_module_in_any_precision_gives_float32_parameters(dtype):
    """The federation gets float32 arrays, equal to the module's values, whatever precision the module was kept in."""
    net = model.new_model(0)
    want = [p.to(dtype).float().numpy() for p in net.state_dict().values()]
    got = model.get_parameters(net.to(dtype))
    assert [p.dtype for p in got] == [np.float32] * 8
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_big_endian_arrays_load_into_the_module():
    """Arrays in big-endian byte order (as a file from a big-endian machine holds them) load as the same weights."""
    params = model.get_parameters(model.new_model(5))
    net = model.new_model(0)
    model.set_parameters(net, [p.astype(">f4") for p in params])
    for a, b in zip(model.get_parameters(net), params):
        np.testing.assert_array_equal(a, b)


def test_parameters_into_a_module_that_is_not_this_cnn_fail_loudly():
    """Parameters for a module that is not this CNN (a wrapped one: keys ``0.conv1.weight``...) fail naming the
    missing keys, and the module keeps its weights: never silently left as it was while the caller thinks it loaded."""
    wrapped = torch.nn.Sequential(model.new_model(0))
    before = [t.clone() for t in wrapped.state_dict().values()]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "0.conv1.weight"'):
        model.set_parameters(wrapped, model.get_parameters(model.new_model(1)))
    assert all(torch.equal(a, b) for a, b in zip(before, wrapped.state_dict().values()))


@pytest.mark.parametrize("source, call, message", [
    ("parameters", lambda p: model.check_parameters(p[:3]), "expected 8 parameter arrays for the MNIST CNN, got 3"),
    ("update 7", lambda p: model.set_parameters(model.Net(), p[:3], "update 7"),
     "expected 8 parameter arrays for the MNIST CNN, got 3"),
    ("update 7", lambda p: model.set_parameters(model.Net(), p[:7] + [np.zeros(10, np.complex64)], "update 7"),
     "array 7 (fc2.bias) is complex64, expected real numbers (float32)"),
    ("parameters", lambda p: model.check_parameters(p[:7] + [np.zeros(10, bool)]),
     "array 7 (fc2.bias) is bool, expected real numbers (float32)"),
])
def test_a_parameter_list_is_refused_naming_its_source_and_what_was_expected(source, call, message):
    """The whole message: the source (``parameters`` when the caller names none, the caller's name otherwise),
    the array and the dtype refused."""
    with pytest.raises(ModelFileError) as error:
        call(model.get_parameters(model.new_model(0)))
    assert str(error.value) == f"{source}: {message}"


def test_a_shape_whose_size_overflows_int64_is_still_past_the_byte_limit(tmp_path):
    """A header declaring (2**32, 2**32) float32 is refused as 2**66 bytes, not read as the 0 an int64 product
    wraps to: the message gives the exact size."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**32, 2**32)})
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue())
    with zipfile.ZipFile(path) as archive, pytest.raises(npz.ArrayError) as error:
        npz.read_member(archive, "x.npy", "x", npz.byte_limit(400, "huge.npz: x"))
    assert str(error.value) == ("huge.npz: x declares shape (4294967296, 4294967296) of float32 "
                                "(73,786,976,294,838,206,464 bytes), more than the limit of 400 bytes")


def test_the_default_seed_is_zero():
    """``new_model()`` is ``new_model(0)``: the seed a caller gets without asking, so two tools agree on it."""
    default, zero, one = (model.get_parameters(m) for m in (model.new_model(), model.new_model(0), model.new_model(1)))
    assert all(np.array_equal(a, b) for a, b in zip(default, zero))
    assert not np.array_equal(default[0], one[0])


def test_a_forward_pass_on_real_digits_warns_about_nothing(mnist5k):
    """Every batch runs this: a warning here (such as torch's implicit-dimension warning) would flood a node's log."""
    images, _ = mnist5k
    x = torch.from_numpy(images[:8].astype(np.float32)[:, None] / 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.new_model(0).eval()(x)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(8))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "transposed", "flat"])
def test_a_mask_is_the_same_byte_stream_in_the_tensors_memory_order_whatever_its_layout(layout):
    """A tensor's mask, read in its memory order, is the byte stream the same generator gives a plain vector
    of that size: a channels_last batch (the training layout) gets a channels_last mask with no reorder, any
    other layout its bytes in row-major order of its shape."""
    base = torch.ones(2, 3, 4, 5)
    x = {"nchw": base, "channels_last": base.contiguous(memory_format=torch.channels_last),
         "transposed": base.transpose(2, 3), "flat": torch.ones(8, 16)}[layout]
    got = random_bytes_like(x, torch.Generator().manual_seed(11))
    stream = random_bytes_like(torch.ones(x.numel()), torch.Generator().manual_seed(11))
    in_memory_order = got.permute(0, 2, 3, 1) if layout == "channels_last" else got
    assert got.shape == x.shape and torch.equal(in_memory_order.reshape(-1), stream)
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


def test_a_mask_takes_eight_bytes_from_each_64_bit_draw():
    """Masks of 113 to 120 elements advance the generator alike and 121 elements by one draw more: eight mask
    bytes per 64-bit number, none wasted (dropout1's 590k-element mask per batch costs 74k draws)."""

    def state_after(count: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(5)
        random_bytes_like(torch.ones(count), generator)
        return generator.get_state()

    assert torch.equal(state_after(113), state_after(120))
    assert not torch.equal(state_after(120), state_after(121))


def test_dropout_with_p_zero_is_the_identity_and_draws_nothing():
    """``Dropout(0.0)`` in training returns its input itself (no copy) and leaves the generator where it was."""
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    x = torch.rand(4, 128)
    assert Dropout(0.0).train()(x, generator) is x
    assert torch.equal(generator.get_state(), before)


def test_the_npz_writer_never_pickles():
    """An object array is refused, not pickled: every npz this package writes reads with ``allow_pickle=False``."""
    with pytest.raises(ValueError, match="allow_pickle=False"):
        npz.write_arrays(io.BytesIO(), [np.zeros(3, np.float32), np.array([{"weights": 1}], dtype=object)])


def test_every_member_is_deflated_at_the_documented_level(tmp_path):
    """``npz.LEVEL`` (1: the same size as higher levels for float32 weights, in less time) is the level of every
    member, so the bytes of a file, and the hash a seed is checked by, depend on nothing else."""
    params = model.get_parameters(model.new_model(0))
    with zipfile.ZipFile(model.save_npz(params, tmp_path / "a.npz")) as archive:
        for info, array in zip(archive.infolist(), params, strict=True):
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=False)
            deflate = zlib.compressobj(npz.LEVEL, zlib.DEFLATED, -15)
            assert info.compress_size == len(deflate.compress(member.getvalue()) + deflate.flush()), info.filename

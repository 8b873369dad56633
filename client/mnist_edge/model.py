"""The "Basic MNIST Example" CNN and its parameters as the federation sees them.

The federation moves a model as a list of float32 numpy arrays in ``state_dict()`` order
(the numpyhelper format). Everything that converts between that list, the torch module and
files on disk lives here, with the shape checks, so no other module guesses at the layout.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from . import npz, pickles
from .errors import UserError
from .files import atomic_write
from .net import Net

PARAMETER_COUNT = 1_199_882
"""Number of trainable scalars in :class:`Net`."""
MAX_MODEL_BYTES = 16 * PARAMETER_COUNT + (1 << 20)
"""Most a model file may declare it holds: every parameter as float64 twice over, plus headers."""


class ModelFileError(UserError, ValueError):
    """A model file or parameter list does not hold this CNN."""


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes, in ``state_dict()`` order."""
    return {name: tuple(t.shape) for name, t in Net().state_dict().items()}


_SHAPES = expected_shapes()


def new_model(seed: int = 0) -> Net:
    """A freshly initialised CNN; the same seed gives bit-identical weights."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return Net()
    finally:
        torch.random.set_rng_state(generator_state)


def get_parameters(net: nn.Module) -> list[np.ndarray]:
    """The module's weights as float32 arrays in ``state_dict()`` order (copies, on the CPU)."""
    return [t.detach().to("cpu", torch.float32).numpy().copy() for t in net.state_dict().values()]


def check_parameters(params: list[np.ndarray], source: str = "parameters") -> None:
    """Raise :class:`ModelFileError` with expected-vs-got unless ``params`` fit :class:`Net`.

    Besides count and shapes: real numbers only, and finite once in float32 (NaN, infinity and
    float64 values beyond float32's range would poison training and every model averaged with it).
    """
    if len(params) != len(_SHAPES):
        raise ModelFileError(
            f"{source}: expected {len(_SHAPES)} parameter arrays for the MNIST CNN, got {len(params)}"
        )
    for index, ((name, shape), array) in enumerate(zip(_SHAPES.items(), params)):
        got = tuple(np.shape(array))
        if got != shape:
            raise ModelFileError(f"{source}: array {index} ({name}) expected shape {shape}, got {got}")
        dtype = np.asarray(array).dtype
        if dtype.kind not in _REAL_KINDS:
            raise ModelFileError(f"{source}: array {index} ({name}) is {dtype}, expected real numbers (float32)")
        _check_finite(np.asarray(array), f"{source}: array {index} ({name})")


_REAL_KINDS = "fiu"  # float, signed and unsigned integers
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_finite(array: np.ndarray, what: str) -> None:
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(array.astype(np.float32, copy=False))
    if finite.all():
        return
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ModelFileError(f"{what} holds {bad} non-finite values (NaN or infinity), expected finite weights")
    largest = float(np.abs(array.astype(np.float64)).max())
    raise ModelFileError(f"{what} overflows float32 (largest magnitude {largest:.3g}, float32 holds up to "
                         f"{_FLOAT32_MAX:.3g})")


def set_parameters(net: nn.Module, params: list[np.ndarray], source: str = "parameters") -> None:
    """Load a parameter list into ``net`` after checking count and shapes."""
    check_parameters(params, source)
    state = {name: torch.from_numpy(np.asarray(a, dtype=np.float32)) for name, a in zip(_SHAPES, params)}
    net.load_state_dict(state, strict=True)


def parameters_to_state_dict(params: list[np.ndarray], source: str = "parameters") -> dict[str, torch.Tensor]:
    """A plain PyTorch state_dict for the CNN (what ``torch.save`` writes to ``.pth``)."""
    check_parameters(params, source)
    return {name: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for name, a in zip(_SHAPES, params)}


def npz_bytes(params: list[np.ndarray]) -> bytes:
    """``params`` as the federation's npz (float32, see :func:`npz.write_arrays`), after the checks."""
    check_parameters(params)
    buffer = io.BytesIO()
    npz.write_arrays(buffer, [np.asarray(a, dtype=np.float32) for a in params])
    return buffer.getvalue()


def save_npz(params: list[np.ndarray], path: str | Path) -> Path:
    """Write ``params`` as a numpyhelper npz file (keys "0".."7"), byte-identical for equal input."""
    check_parameters(params, str(path))
    content = npz_bytes(params)
    return atomic_write(Path(path), lambda handle: handle.write(content), mode="wb")


def read_npz(stream: BinaryIO, source: str) -> list[np.ndarray]:
    """The CNN's parameters from a numpyhelper npz (a zip of ``0.npy`` .. ``7.npy``), no pickle.

    Every member's header is checked (name, dtype, exact shape, declared size) before its data
    is read, so a small file declaring a huge array costs nothing: at most the CNN's size is read.
    """
    try:
        with zipfile.ZipFile(stream) as archive:
            names = archive.namelist()
            expected = [f"{i}.npy" for i in range(len(_SHAPES))]
            if sorted(names) != sorted(expected) and sorted(names) == sorted(f"{i}.npy" for i in range(len(names))):
                raise ModelFileError(f"{source}: expected {len(_SHAPES)} parameter arrays for the MNIST CNN, "
                                     f"got {len(names)}")
            if sorted(names) != sorted(expected):
                shown = ", ".join(repr(n[:40]) for n in names[:10]) or "nothing"
                raise ModelFileError(f"{source}: expected arrays named 0..{len(_SHAPES) - 1}, got {shown}")
            params = [_read_member(archive, i, source) for i in range(len(_SHAPES))]
    except ModelFileError:
        raise
    except npz.ArrayError as error:
        raise ModelFileError(str(error)) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as error:
        raise ModelFileError(f"{source}: not a numpy .npz parameter file without pickles ({error})") from None
    check_parameters(params, source)
    return [np.array(a, dtype=np.float32) for a in params]  # writable copies (np.frombuffer is read-only)


def _read_member(archive: zipfile.ZipFile, index: int, source: str) -> np.ndarray:
    name = list(_SHAPES)[index]
    what = f"{source}: array {index} ({name})"

    def check(shape: tuple[int, ...], dtype: np.dtype) -> None:
        if dtype.kind not in _REAL_KINDS or dtype.itemsize > 8:
            raise ModelFileError(f"{what} is {dtype}, expected real numbers (float32)")
        if shape != _SHAPES[name]:
            raise ModelFileError(f"{what} expected shape {_SHAPES[name]}, got {shape}")

    return npz.read_member(archive, f"{index}.npy", what, check)


def load_npz(path: str | Path) -> list[np.ndarray]:
    """Read a seed/global ``.npz`` (no pickle) and check it holds this CNN."""
    path = Path(path)
    _check_model_path(path)
    try:
        with open(path, "rb") as handle:
            return read_npz(handle, str(path))
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read model file ({error.strerror or error})") from None


def _check_model_path(path: Path) -> None:
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory, expected a model file (.npz or .pth)")
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file")
    if not path.is_file():
        raise ModelFileError(f"{path}: is not a regular file (a device, FIFO or socket), expected a model file")


# -- PyTorch .pth files and telling model files apart -------------------------------------------

_NOT_A_MODEL = (
    "expected a numpy .npz (zip of .npy arrays) or a PyTorch .pth (torch.save zip); other pickles are refused"
)


def model_file_kind(path: str | Path) -> str:
    """``"npz"`` or ``"pth"``, decided by the file's content, not its name.

    Both formats are zip archives: an npz holds only ``.npy`` entries, ``torch.save`` writes a
    ``data.pkl`` entry. Anything else (a bare pickle renamed ``.npz``, a legacy torch file)
    is refused before any loader sees it.
    """
    path = Path(path)
    _check_model_path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelFileError(f"{path}: not a model file, {_NOT_A_MODEL} ({error})") from None
    if declared > MAX_MODEL_BYTES:
        raise ModelFileError(f"{path}: declares {declared:,} bytes of contents, more than the "
                             f"{MAX_MODEL_BYTES:,} a model of this CNN can need")
    if names and all(name.endswith(".npy") for name in names):
        return "npz"
    if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        return "pth"
    raise ModelFileError(f"{path}: a zip archive but not a model file, {_NOT_A_MODEL} (entries {names[:4]})")


def state_dict_to_parameters(state: object, source: str = "state_dict") -> list[np.ndarray]:
    """The parameter list of a plain PyTorch state_dict, after checking names and shapes."""
    if not isinstance(state, dict):
        kind = type(state).__name__
        raise ModelFileError(f"{source}: expected a state_dict (a dict of tensors), got {kind}")
    missing = [name for name in _SHAPES if name not in state]
    unexpected = [pickles.short(name) for name in state if name not in _SHAPES]
    if missing or unexpected:
        raise ModelFileError(
            f"{source}: state_dict does not match the MNIST CNN"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {unexpected[:5]}" if unexpected else "")
        )
    for name in _SHAPES:
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            raise ModelFileError(f"{source}: {name} is a {type(tensor).__name__}, expected a tensor")
        if tensor.is_meta or tensor.layout != torch.strided or tensor.is_quantized:
            kind = "meta" if tensor.is_meta else "quantized" if tensor.is_quantized else str(tensor.layout)
            raise ModelFileError(f"{source}: {name} is a {kind} tensor, expected a dense tensor of real numbers")
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise ModelFileError(f"{source}: {name} is {tensor.dtype}, expected real numbers (float32)")
        got = tuple(tensor.shape)
        if got != _SHAPES[name]:
            raise ModelFileError(f"{source}: {name} expected shape {_SHAPES[name]}, got {got}")
    params = [state[name].detach().to("cpu", torch.float64).numpy().copy() for name in _SHAPES]
    check_parameters(params, source)
    return [p.astype(np.float32) for p in params]


def save_pth(params: list[np.ndarray], path: str | Path) -> Path:
    """Write ``params`` as a plain state_dict that ``Net().load_state_dict`` accepts."""
    state = parameters_to_state_dict(params, str(path))
    return atomic_write(Path(path), lambda handle: torch.save(state, handle), mode="wb")


def load_pth(path: str | Path) -> list[np.ndarray]:
    """Read a ``.pth`` state_dict with ``weights_only=True`` (no code runs) and check it.

    The pickles are scanned first: a shape that would crash the unpickler (not just fail) is refused.
    """
    import pickle  # for its exception type only: torch's restricted unpickler does the reading

    path = Path(path)
    if model_file_kind(path) != "pth":
        raise ModelFileError(f"{path}: is a numpy .npz parameter file, expected a PyTorch .pth state_dict")
    try:
        pickles.check_zip(path)
    except pickles.PickleShapeError as error:
        raise ModelFileError(str(error)) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError, RecursionError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(
            f"{path}: not a state_dict that loads with weights_only=True ({first_line})"
        ) from None
    return state_dict_to_parameters(state, str(path))


def load_model_file(path: str | Path) -> list[np.ndarray]:
    """The CNN's parameters from a ``.npz`` or a ``.pth``, whichever the content is."""
    return load_npz(path) if model_file_kind(path) == "npz" else load_pth(path)

"""The "Basic MNIST Example" CNN and its parameters as the federation sees them.

The federation moves a model as a list of float32 numpy arrays in ``state_dict()`` order
(the numpyhelper format). Everything that converts between that list, the torch module and
files on disk lives here, with the shape checks, so no other module guesses at the layout.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PARAMETER_COUNT = 1_199_882
"""Number of trainable scalars in :class:`Net`."""


class ModelFileError(ValueError):
    """A model file or parameter list does not hold this CNN."""


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same scaling), drawing its mask with :func:`dropout`."""

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return dropout(x, self.p, generator) if self.training and self.p > 0 else x


class Net(nn.Module):
    """pytorch/examples mnist/main.py ``Net``: 2 conv, max-pool, 2 dropout, 2 linear.

    The same function as the example's, computed in a cheaper order: ReLU after the max-pool
    instead of before (``max(relu(a), relu(b)) == relu(max(a, b))``, gradients included, so the
    outputs and gradients are bit-identical) works on a quarter of the elements. ``generator``
    draws the dropout masks (default: torch's global generator), so concurrent parts of one
    batch can each draw their own reproducibly (see ``training``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = Dropout(0.25)
        self.dropout2 = Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = self.dropout1(x, generator)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x, generator)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def dropout(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout as ``F.dropout(x, p, training=True)``: zero with probability ``p``, scale by ``1/(1-p)``.

    The mask compares one random byte per element with ``256 p`` (so ``p`` must be a multiple of
    1/256, as 0.25 and 0.5 are: the keep probability is then exact), eight bytes per 64-bit
    draw; torch's ``bernoulli_`` draws and compares a float per element, several times slower
    for ``dropout1``'s 590k-element mask per batch.
    """
    threshold = p * 256
    if threshold != int(threshold):
        raise ValueError(f"dropout p must be a multiple of 1/256, got {p}")
    keep = random_bytes_like(x, generator) >= int(threshold)
    return x.mul(keep).mul_(1.0 / (1.0 - p))


def random_bytes_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random uint8 in ``x``'s shape and memory layout (NCHW or channels_last)."""
    count = x.numel()
    draws = torch.empty((count + 7) // 8, dtype=torch.int64, device=x.device)
    flat = draws.random_(-(2**63), None, generator=generator).view(torch.uint8)[:count]  # full 64-bit range
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = x.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(x.shape)


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
    """Raise :class:`ModelFileError` with expected-vs-got unless ``params`` fit :class:`Net`."""
    if len(params) != len(_SHAPES):
        raise ModelFileError(
            f"{source}: expected {len(_SHAPES)} parameter arrays for the MNIST CNN, got {len(params)}"
        )
    for index, ((name, shape), array) in enumerate(zip(_SHAPES.items(), params)):
        got = tuple(np.shape(array))
        if got != shape:
            raise ModelFileError(f"{source}: array {index} ({name}) expected shape {shape}, got {got}")
        if not np.issubdtype(np.asarray(array).dtype, np.number):
            raise ModelFileError(f"{source}: array {index} ({name}) is not numeric ({np.asarray(array).dtype})")


def set_parameters(net: nn.Module, params: list[np.ndarray], source: str = "parameters") -> None:
    """Load a parameter list into ``net`` after checking count and shapes."""
    check_parameters(params, source)
    state = {name: torch.from_numpy(np.asarray(a, dtype=np.float32)) for name, a in zip(_SHAPES, params)}
    net.load_state_dict(state, strict=True)


def parameters_to_state_dict(params: list[np.ndarray], source: str = "parameters") -> dict[str, torch.Tensor]:
    """A plain PyTorch state_dict for the CNN (what ``torch.save`` writes to ``.pth``)."""
    check_parameters(params, source)
    return {name: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for name, a in zip(_SHAPES, params)}


def save_npz(params: list[np.ndarray], path: str | Path) -> Path:
    """Write ``params`` as a numpyhelper npz (keys "0".."7"), byte-identical for equal input.

    ``np.savez`` stamps each zip entry with the current time; fixing the timestamp makes two
    builds of the same seed produce the same bytes, so a seed can be checked by its hash.
    """
    check_parameters(params, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index, array in enumerate(params):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{index}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            archive.writestr(entry, buffer.getvalue())
    return path


def load_npz(path: str | Path) -> list[np.ndarray]:
    """Read a seed/global ``.npz`` (no pickle) and check it holds this CNN."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = sorted(archive.files, key=lambda k: int(k) if k.isdigit() else -1)
            if not all(k.isdigit() for k in keys):
                raise ModelFileError(f"{path}: expected arrays named 0..{len(_SHAPES) - 1}, got {archive.files}")
            params = [archive[k] for k in keys]
    except ModelFileError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise ModelFileError(f"{path}: not a numpy .npz parameter file without pickles ({error})") from error
    check_parameters(params, str(path))
    return [np.asarray(a, dtype=np.float32) for a in params]


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
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelFileError(f"{path}: not a model file, {_NOT_A_MODEL} ({error})") from None
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
    unexpected = [str(name) for name in state if name not in _SHAPES]
    if missing or unexpected:
        raise ModelFileError(
            f"{source}: state_dict does not match the MNIST CNN"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {unexpected[:5]}" if unexpected else "")
        )
    for name in _SHAPES:
        if not isinstance(state[name], torch.Tensor):
            raise ModelFileError(f"{source}: {name} is a {type(state[name]).__name__}, expected a tensor")
        got = tuple(state[name].shape)
        if got != _SHAPES[name]:
            raise ModelFileError(f"{source}: {name} expected shape {_SHAPES[name]}, got {got}")
    return [state[name].detach().to("cpu", torch.float32).numpy().copy() for name in _SHAPES]


def save_pth(params: list[np.ndarray], path: str | Path) -> Path:
    """Write ``params`` as a plain state_dict that ``Net().load_state_dict`` accepts."""
    state = parameters_to_state_dict(params, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def load_pth(path: str | Path) -> list[np.ndarray]:
    """Read a ``.pth`` state_dict with ``weights_only=True`` (no code runs) and check it."""
    import pickle  # for its exception type only: torch's restricted unpickler does the reading

    path = Path(path)
    if model_file_kind(path) != "pth":
        raise ModelFileError(f"{path}: is a numpy .npz parameter file, expected a PyTorch .pth state_dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(
            f"{path}: not a state_dict that loads with weights_only=True ({first_line})"
        ) from None
    return state_dict_to_parameters(state, str(path))


def load_model_file(path: str | Path) -> list[np.ndarray]:
    """The CNN's parameters from a ``.npz`` or a ``.pth``, whichever the content is."""
    return load_npz(path) if model_file_kind(path) == "npz" else load_pth(path)

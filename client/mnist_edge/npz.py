"""``.npz`` files: written byte-identically, read with sizes checked before anything is allocated.

``np.load`` allocates whatever shape an ``.npy`` header declares before reading a byte of data,
so an 18 MB file can ask for 4 GiB. Here the header is read first and handed to a check, and
only then exactly the declared bytes are read (pickled object arrays are never read at all).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence
from typing import IO

import numpy as np

from .errors import UserError

LEVEL = 1
"""Deflate level: float32 weights barely compress past what level 1 finds, so it is the same size in less time."""
_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


def write_arrays(handle: IO[bytes], arrays: Sequence[np.ndarray]) -> None:
    """The numpyhelper's npz (members ``0.npy``, ``1.npy``, ...), the same bytes for the same arrays.

    ``np.savez`` stamps each member with the current time; a fixed timestamp lets a seed be
    checked by its hash. The server's and combiner's stock numpyhelper read it unchanged.
    """
    with zipfile.ZipFile(handle, "w") as archive:
        for index, array in enumerate(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{index}.npy", date_time=_TIMESTAMP)
            entry.external_attr = 0o644 << 16
            archive.writestr(entry, buffer.getbuffer(), zipfile.ZIP_DEFLATED, LEVEL)


class ArrayError(UserError, ValueError):
    """An array member must not be read; the message is complete (names the member and why)."""


Check = Callable[[tuple[int, ...], np.dtype], None]
"""Raises if an array of this shape and dtype must not be read."""


def read_member(archive: zipfile.ZipFile, name: str, what: str, check: Check) -> np.ndarray:
    """Member ``name`` as an array, after ``check(shape, dtype)``; :class:`ArrayError` says what is wrong."""
    with archive.open(name) as member:
        version = np.lib.format.read_magic(member)
        if version not in ((1, 0), (2, 0)):
            raise ArrayError(f"{what}: .npy format version {version}, expected 1.0 or 2.0")
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(member)
        if dtype.hasobject or dtype.kind not in "biuf":
            raise ArrayError(f"{what} is {dtype}, expected plain numbers")
        check(tuple(shape), dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        data = member.read(size)
        if len(data) != size:
            raise ArrayError(f"{what}: truncated ({len(data)} of {size} bytes)")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def byte_limit(limit: int, what: str) -> Check:
    """A check that refuses (ArrayError) arrays declaring more than ``limit`` bytes."""

    def check(shape: tuple[int, ...], dtype: np.dtype) -> None:
        size = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if size > limit:
            raise ArrayError(f"{what} declares shape {shape} of {dtype} ({size:,} bytes), more than the "
                             f"limit of {limit:,} bytes")

    return check

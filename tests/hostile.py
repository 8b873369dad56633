"""What a hostile server or a broken export sends a node, built as real files and real models.

Helpers for the trust-boundary tests: a node (a real ``EdgeClient`` on the in-process runtime,
with this package's callbacks), models with chosen ids or values, raw shard lines, crafted PNGs,
and compression bombs built without compressing gigabytes (repeated fully flushed deflate
segments decode to the same zeros, so a bomb of any declared size costs milliseconds to make).
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scaleout import ScaleoutModel
from scaleoututil.helpers.helpers import get_helper

from mnist_edge import model, runtime

HEADER = "image_id,label,image,start_datetime,end_datetime,location"


@dataclass
class Node:
    """One node's data directory and its client; what the callbacks sent is in ``runtime``."""

    data_dir: Path
    client: Any
    runtime: runtime.LocalRuntime

    def run(self, task: str, *args: Any) -> Any:
        return runtime.run_task(self.client, task, *args, model_id="m", round_id="r")


class Evil:
    """Unpickling this makes a directory: proof that a loader executed the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def node(data_dir: Path, workdir: Path | None = None) -> Node:
    """A client with this package's callbacks; ``workdir`` (made if missing) gets its ``.model_cache``."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    recorder = runtime.LocalRuntime()
    return Node(data_dir, runtime.local_client(data_dir, recorder, workdir=workdir), recorder)


def scaleout_model(params: list[np.ndarray], model_id: str | None = None) -> ScaleoutModel:
    built = ScaleoutModel.from_training_model(params, get_helper("numpyhelper"))
    return built.to_builder().set_model_id(model_id).build() if model_id is not None else built


def with_id(scaleout: ScaleoutModel, model_id: str) -> ScaleoutModel:
    """The same model under another id (the server chooses ids; a hostile one chooses paths)."""
    return scaleout.to_builder().set_model_id(model_id).build()


def seed_params(seed_path: Path) -> list[np.ndarray]:
    return model.load_npz(seed_path)


def b64_raw(pixels: np.ndarray) -> str:
    return base64.b64encode(np.asarray(pixels, dtype=np.uint8).tobytes()).decode()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG signature and IHDR for ``width`` x ``height`` grayscale, then a few bytes of nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\x00" * 64)
    idat_chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + chunk + idat_chunk


def write_lines(path: Path, lines: list[str | bytes], newline: bytes = b"\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = [line.encode() if isinstance(line, str) else line for line in lines]
    path.write_bytes(newline.join(encoded) + newline)
    return path


def rows(images: np.ndarray, labels: np.ndarray, start: int = 0) -> list[str]:
    return [f"{start + i},{labels[i]},{b64_raw(images[i])},,," for i in range(len(labels))]


# -- bombs ----------------------------------------------------------------------------------------

_ZEROS = bytes(1 << 20)


def deflate_zeros(prefix: bytes, total: int) -> tuple[bytes, int]:
    """Raw deflate of ``prefix`` + zeros up to ``total`` bytes, and its CRC-32, in milliseconds.

    After ``Z_FULL_FLUSH`` a compressor starts afresh at a byte boundary, so the segment for one
    MiB of zeros is the same every time and can be repeated instead of recomputed.
    """
    assert total % len(_ZEROS) == 0 and total >= 2 * len(_ZEROS) and len(prefix) < len(_ZEROS)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(prefix + _ZEROS[len(prefix) :]) + compressor.flush(zlib.Z_FULL_FLUSH)
    segment = compressor.compress(_ZEROS) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(_ZEROS) + compressor.flush(zlib.Z_FULL_FLUSH) == segment
    count = total // len(_ZEROS)
    stream = first + segment * (count - 2) + compressor.compress(_ZEROS) + compressor.flush(zlib.Z_FINISH)
    crc = zlib.crc32(prefix + _ZEROS[len(prefix) :])
    for _ in range(count - 1):
        crc = zlib.crc32(_ZEROS, crc)
    return stream, crc


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npz_bomb(path: Path, member: str, shape: tuple[int, ...], others: dict[str, np.ndarray] | None = None) -> Path:
    """An npz whose ``member`` declares ``shape`` float32 zeros (up to 2 GiB), stored as a few MB.

    The member is written by hand (local header + deflate + central directory) with sizes below
    4 GiB, so no zip64 is needed; ``others`` are written normally after it.
    """
    header = npy_header(shape)
    size = len(header) + int(np.prod(shape)) * 4
    padded = -(-size // len(_ZEROS)) * len(_ZEROS)
    stream, crc = deflate_zeros(header, padded)
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.CRC, info.compress_size, info.file_size = crc, len(stream), padded
        archive.fp.write(info.FileHeader(zip64=False))
        archive.fp.write(stream)
        archive.start_dir = archive.fp.tell()
        info.header_offset = 0
        archive.filelist.append(info)
        archive.NameToInfo[member] = info
        for name, array in (others or {}).items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array)
            archive.writestr(name, buffer.getvalue())
    return path


def gzip_bomb(path: Path, prefix: bytes, total: int) -> Path:
    """A gzip file of ``prefix`` + zeros up to ``total`` bytes (a multiple of 1 MiB)."""
    stream, crc = deflate_zeros(prefix, total)
    header = b"\x1f\x8b\x08\x00" + bytes(4) + b"\x00\xff"
    path.write_bytes(header + stream + struct.pack("<II", crc, total & 0xFFFFFFFF))
    return path


def peak_rss_mb(cases: dict[str, str], timeout: float = 600) -> dict[str, tuple[float, str]]:
    """Run each case's code in one fresh interpreter; per case (its peak RSS in MB, what it printed).

    The usual imports happen once, first. Before each case the freed memory is returned to the
    system and the kernel's high-water mark is reset (``clear_refs``), so a case's peak is what
    its own code allocated, not the imports' or an earlier case's.
    """
    script = textwrap.dedent("""
        import contextlib, ctypes, gc, io, json, sys
        import numpy, torch, PIL.Image, scaleout, mnist_edge.data, mnist_edge.edge, mnist_edge.prepare
        def status(key):
            return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))
        results = {}
        for name, code in json.loads(sys.stdin.read()).items():
            gc.collect()
            ctypes.CDLL(None).malloc_trim(0)
            open('/proc/self/clear_refs', 'w').write('5')
            base, printed = status('VmRSS:'), io.StringIO()
            with contextlib.redirect_stdout(printed):
                try:
                    exec(code, {})
                except Exception as error:  # one case's failure is its own result, not the others'
                    print(f"raised {type(error).__name__}: {error}")
            results[name] = ((status('VmHWM:') - base) / 1024, printed.getvalue().strip())
        print(json.dumps(results))
    """)
    payload = json.dumps({name: textwrap.dedent(code) for name, code in cases.items()})
    result = subprocess.run([sys.executable, "-c", script], input=payload, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: tuple(value) for name, value in json.loads(result.stdout.strip().splitlines()[-1]).items()}

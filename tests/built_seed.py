"""The seed model the real ``scaleout run build -p client`` writes, built once per process.

A plain module (imported, not collected) for the reason real_images.py gives: `make mutate` runs
one pytest session per mutant in processes forked from one warm process, where a session-scoped
fixture would run the build (a subprocess that imports torch) again for every mutant. Every test
only reads the file.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


@functools.cache
def seed_npz(client_dir: Path, scaleout: Path) -> Path:
    """``seed.npz`` of ``scaleout run build -p client_dir``, in a folder removed when this process exits."""
    out = Path(tempfile.mkdtemp(prefix="mnist-edge-seed-"))
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(out, ignore_errors=True))
    subprocess.run(
        [str(scaleout), "run", "build", "-p", str(client_dir)],
        cwd=out, env={**os.environ, "SCALEOUT_BUILD_OUTPUT_DIR": str(out)},
        check=True, capture_output=True, text=True, timeout=120,
    )
    path = out / "seed.npz"
    assert path.is_file(), "scaleout run build wrote no seed.npz"
    return path

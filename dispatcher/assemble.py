"""Assemble the dispatcher compute package: ``python dispatcher/assemble.py OUT_DIR``.

OUT_DIR gets this folder's ``scaleout.yaml`` and, from ``client/``, ``python_env.yaml``,
``.scaleoutignore`` and the library ``mnist_edge/`` (the dispatcher's commands import it from
the package directory, their working directory). Standard library only: ``make
package-dispatcher`` and the tests run it before anything is installed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT = HERE.parent / "client"
FROM_CLIENT = ("python_env.yaml", ".scaleoutignore")


def assemble(out: Path) -> Path:
    """Write the package into ``out`` (replaced if it exists); return it."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(HERE / "scaleout.yaml", out / "scaleout.yaml")
    for name in FROM_CLIENT:
        shutil.copy(CLIENT / name, out / name)
    shutil.copytree(CLIENT / "mnist_edge", out / "mnist_edge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python dispatcher/assemble.py OUT_DIR")
    print(f"assembled the dispatcher package in {assemble(Path(sys.argv[1]))}")

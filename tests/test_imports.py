"""Imports run one way: the tools that work without Scaleout never load it, and the learning code
never imports it, so the same code serves the edge client, the dispatcher, torchrun and pipelines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CLIENT_DIR

PACKAGE = CLIENT_DIR / "mnist_edge"
SEAM = {"edge.py", "container.py", "runtime.py", "simulate.py", "dispatch.py"}
"""The modules that adapt the learning code to the scaleout client (and the local federation on it)."""


def loaded_modules(*args: str) -> set[str]:
    """The modules ``python -X importtime -m mnist_edge ARGS`` imports."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "mnist_edge", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("command", ["train", "predict", "export", "import", "aggregate", "privacy", "lineage"])
def test_the_commands_without_scaleout_never_load_it(command):
    modules = loaded_modules(command, "--help")
    assert "mnist_edge.cli" in modules
    assert not {m for m in modules if m.split(".")[0] in ("scaleout", "scaleoututil")}


def test_only_the_seam_imports_scaleout():
    """Parsed, not run: every ``import scaleout...`` in the library is in a seam module."""
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] in ("scaleout", "scaleoututil") for name in names):
                importers.add(str(path.relative_to(PACKAGE)))
    assert importers and importers <= SEAM, importers - SEAM


def test_no_library_module_reads_the_environment_or_the_working_directory():
    """Configuration is read where the process starts (cli, edge.register, node.from_environment's
    caller) and passed down: nothing else reads ``os.environ``, ``os.getenv`` or the working directory."""
    entry_points = {"cli.py", "edge.py", "dispatch.py", "__main__.py"}
    readers = set()
    reads = {("os", "environ"), ("os", "getenv"), ("os", "getcwd"), ("os", "environb"), ("Path", "cwd")}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and (node.value.id, node.attr) in reads:
                readers.add(str(path.relative_to(PACKAGE)))
    assert readers and readers <= entry_points, readers - entry_points


def test_no_module_is_longer_than_a_few_screens():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(lengths.values()) <= 320, {name: n for name, n in lengths.items() if n > 320}


def test_client_packages_build_and_startup_stay_a_few_dozen_lines():
    for entry in (Path(CLIENT_DIR) / "build.py", Path(CLIENT_DIR) / "startup.py"):
        assert len(entry.read_text().splitlines()) <= 40, entry

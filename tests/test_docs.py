"""docs/ builds with Sphinx, warnings as errors, and shows the plots drawn from bench/results/.

A broken reference, a malformed page or a plot whose results file is gone fails the build, so
the docs a reader sees cannot be missing a page or show a plot of numbers that are not there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

DOCS = REPO / "docs"
PLOTS = ("federation", "privacy", "throughput")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def build(out: Path, *options: str) -> subprocess.CompletedProcess:
    """``sphinx-build`` from scratch (``-E``), nitpicky (``-n``), every warning an error (``-W``)."""
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-E", "-W", "-n", "--keep-going", "-q", "-b", "html", *options,
         str(DOCS), str(out)],
        capture_output=True, text=True, timeout=300, check=False)


def test_the_docs_build_without_warnings_and_show_the_plots(tmp_path):
    result = build(tmp_path / "html")
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "html" / "results.html").read_text(encoding="utf-8")
    for name in PLOTS:
        image = tmp_path / "html" / "_images" / f"{name}.png"
        assert image.is_file(), f"the {name} plot was not drawn"
        assert image.read_bytes().startswith(PNG_SIGNATURE) and image.stat().st_size > 10_000, image
        assert f'src="_images/{name}.png"' in page, f"results.html does not show the {name} plot"


def test_a_missing_results_file_fails_the_build_naming_it(tmp_path):
    """The plots read the results at build time; without a file they read, there is no docs build."""
    results = tmp_path / "results"
    shutil.copytree(REPO / "bench" / "results", results)
    (results / "history-iid-batch8.csv").unlink()
    result = build(tmp_path / "html", "-D", f"results_dir={results}")
    assert result.returncode != 0, "the docs built without a results file the federation plot reads"
    assert "history-iid-batch8.csv: no such results file" in result.stdout + result.stderr

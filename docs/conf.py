"""Sphinx configuration: the depth behind README.rst, with plots drawn from bench/results/.

Build: ``python -m sphinx -W -n -b html docs docs/_build/html`` (tests/test_docs.py does the same
into a temporary directory, warnings as errors). ``-D results_dir=PATH`` reads another results
folder (relative to docs/).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "mnist-edge"
author = "mnist-edge maintainers"
extensions = ["results_plots"]
root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = True
html_theme = "alabaster"
html_static_path: list[str] = []
# The pages link to the repository's files (README.rst, bench/README.rst) by path: plain text here.

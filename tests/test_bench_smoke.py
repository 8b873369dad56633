"""The benchmarks run end to end at a tiny size, so they cannot rot; their speeds are not checked
here (timings live in bench/results and the README, not in assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

SMOKE_RUNS = {
    "train_throughput.py": ["--train", "128", "--test", "64", "--reps", "1", "--threads", "1"],
    "ingest.py": ["--rows", "200", "--png-rows", "50", "--reps", "1"],
    "round_overhead.py": ["--images", "128", "--reps", "1", "--threads", "1"],
    "privacy.py": ["--batch", "8", "--steps", "1", "--reps", "1", "--threads", "1", "--modes", "hooks", "ghost",
                   "--clients", "2", "--rounds", "1", "--train-images", "64", "--fed-batch-size", "32",
                   "--budgets", "8"],
}
EXPECTED = {
    "train_throughput.py": "median ratio B/A",
    "ingest.py": "peak RSS above the interpreter+imports baseline",
    "round_overhead.py": "everything except the training steps",
    "privacy.py": "DP step (ghost) / plain step (auto)",
}


@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_runs_at_a_tiny_size(script: str, tmp_path: Path) -> None:
    out = tmp_path / "report.txt"
    result = subprocess.run([sys.executable, str(BENCH / script), *SMOKE_RUNS[script], "--out", str(out)],
                            cwd=BENCH.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert EXPECTED[script] in out.read_text()

"""The benchmarks run end to end at a tiny size, so they cannot rot; their speeds are not checked
here (timings live in bench/results and bench/README.rst, not in assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_edge import hardware

BENCH = Path(__file__).resolve().parents[1] / "bench"

THROUGHPUT_RUN = ["--train", "128", "--test", "64", "--reps", "1", "--threads", "2"]
SMOKE_RUNS = {
    "train_ideas.py": ["--rounds", "2", "--steps", "1", "--threads", "2"],
    "ingest.py": ["--rows", "200", "--png-rows", "50", "--reps", "1"],
    "round_overhead.py": ["--images", "128", "--reps", "1", "--threads", "1"],
    "privacy.py": ["--batch", "8", "--steps", "1", "--reps", "1", "--threads", "1", "--modes", "hooks", "ghost",
                   "--layouts", "2", "--rounds", "1", "--runs", "1", "--train-images", "64", "--budgets", "8"],
    "shared_box.py": ["--clients", "2", "--threads", "1", "--images", "128", "--reps", "1"],
}
EXPECTED = {
    "train_ideas.py": "fp32 without channels_last",
    "ingest.py": "peak RSS above the interpreter+imports baseline",
    "round_overhead.py": "container.to_scaleout_model (level-1 npz stored as it is)",
    "privacy.py": "DP step (ghost) / plain (fp32) step: median ratio",
    "shared_box.py": "run: 2 clients x 128 images, threads 1",
}


@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_runs_at_a_tiny_size(script: str, tmp_path: Path) -> None:
    out = tmp_path / "report.txt"
    result = subprocess.run([sys.executable, str(BENCH / script), *SMOKE_RUNS[script], "--out", str(out)],
                            cwd=BENCH.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    assert EXPECTED[script] in report


def test_train_throughput_compares_fp32_and_native_bf16_naming_the_cpu_in_every_result(tmp_path):
    out = tmp_path / "report.txt"
    result = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), *THROUGHPUT_RUN,
                             "--out", str(out)], cwd=BENCH.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = out.read_text().splitlines()
    tag = lines[0].removeprefix("cpu: ").split("; results class")[0]  # model [flags]
    assert "[" in tag and lines[1].startswith("torch.cpu capabilities: ")
    results = [line for line in lines if " / A: median ratio " in line]
    native = hardware.bf16_supported(torch.device("cpu"))
    assert [line.split(" / A")[0] for line in results] == ["B fp32"] + (["B bf16"] if native else [])
    assert all(tag in line and "load " in line for line in results)


@pytest.mark.e2e
def test_many_clients_runs_real_clients_and_reports_every_mode(tmp_path: Path) -> None:
    """Real ``scaleout client start`` processes at a tiny size: each mode's rounds, the peak RSS of
    every client and the summary against the client alone."""
    out = tmp_path / "report.txt"
    result = subprocess.run([sys.executable, str(BENCH / "many_clients.py"), "--clients", "2", "--images-per-client",
                             "64", "--rounds", "1", "--modes", "alone,budget", "--work", str(tmp_path),
                             "--out", str(out)], cwd=BENCH.parent, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    assert "alone (1 client):\n  round 1: 64 images in " in report
    assert "budget (2 clients):\n  round 1: 128 images in " in report
    assert "2 distinct data fingerprint(s)" in report.split("budget (2 clients)")[1]
    assert report.count("peak RSS per client (MiB): ") == 2
    summary = report.split("summary (last round)")[1].splitlines()
    assert [line.split()[:3][:2] for line in summary[1:]] == [["alone", "1"], ["budget", "2"]]
    assert summary[1].split()[3] == "1.00x"

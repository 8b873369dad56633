"""Shard ingest: our reader (``data.read_shard``) against the naive reader, one process.

The naive reader is what a user writes first: ``csv.DictReader`` + ``base64.b64decode`` +
``np.frombuffer`` per row. Both read the same 60,000-row shard (the 5k subset repeated, raw-byte
images), alternating naive/ours; the report gives the median images/s (wall and CPU time), the
median of the per-pair ratios, the peak RSS each reader adds to a fresh interpreter that has
already imported everything (the pixels alone are 47 MB), and our images/s on a PNG shard.

    .venv/bin/python bench/ingest.py [--rows 60000 --png-rows 60000 --reps 3]
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mnist_edge import data


def naive_read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reader a user writes first (raw images only; no bad-row handling)."""
    ids, labels, pixels = [], [], []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            ids.append(int(row["image_id"]))
            labels.append(int(row["label"]))
            pixels.append(np.frombuffer(base64.b64decode(row["image"]), dtype=np.uint8).reshape(28, 28))
    return np.array(ids), np.array(labels), np.stack(pixels)


def ours_read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shard = data.read_shard(path)
    return shard.image_ids, shard.labels, shard.images


READERS = {"naive": naive_read, "ours": ours_read}


def timed(reader, path: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one read."""
    wall, cpu = time.perf_counter(), time.process_time()
    reader(path)
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_rss_above_baseline(reader: str, path: Path) -> float:
    """MB the reader adds to a fresh interpreter's RSS at its peak (measured in a subprocess)."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", reader, str(path)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_above_baseline_mb"]


def rss_child(reader: str, path: Path) -> None:
    baseline = _status_kib("VmRSS")  # interpreter + numpy + mnist_edge.data imported
    READERS[reader](path)
    peak = _status_kib("VmHWM")  # this process's peak RSS (unlike ru_maxrss, not inherited across exec)
    print(json.dumps({"peak_above_baseline_mb": (peak - baseline) * 1024 / 1e6}))


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key} (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=60_000, help="rows of the raw shard (default 60000)")
    parser.add_argument("--png-rows", type=int, default=60_000, help="rows of the PNG shard (default 60000)")
    parser.add_argument("--reps", type=int, default=3, help="naive/ours pairs (default 3)")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument("--rss-child", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], Path(args.rss_child[1]))
        return
    from perf_common import Report, cpu_tag, images, load, machine, median  # torch: not in the RSS child

    report = Report()
    report(machine())
    with tempfile.TemporaryDirectory() as tmp:
        raw, png = Path(tmp) / "raw.csv", Path(tmp) / "png.csv"
        pixels, labels = images(args.rows)
        data.write_shard(raw, pixels, labels)
        pixels, labels = images(args.png_rows)
        data.write_shard(png, pixels, labels, fmt="png")
        report(
            f"raw shard: {args.rows} rows, {raw.stat().st_size / 1e6:.1f} MB; "
            f"PNG shard: {args.png_rows} rows, {png.stat().st_size / 1e6:.1f} MB; pixels {args.rows * 784 / 1e6:.1f} MB"
        )
        for got, want in zip(ours_read(raw), naive_read(raw)):
            assert np.array_equal(got, want), "our reader and the naive reader disagree"
        wall: dict[str, list[float]] = {"naive": [], "ours": [], "png": []}
        cpu: dict[str, list[float]] = {"naive": [], "ours": [], "png": []}
        for rep in range(args.reps):
            for name, reader, path, rows in (
                ("naive", naive_read, raw, args.rows),
                ("ours", ours_read, raw, args.rows),
                ("png", ours_read, png, args.png_rows),
            ):
                seconds, cpu_seconds = timed(reader, path)
                wall[name].append(rows / seconds)
                cpu[name].append(rows / cpu_seconds)
                report(f"rep {rep} {name:5}: {wall[name][-1]:9.0f} images/s wall  {cpu[name][-1]:9.0f} images/s CPU")
        ratios = [o / n for n, o in zip(wall["naive"], wall["ours"])]
        cpu_ratios = [o / n for n, o in zip(cpu["naive"], cpu["ours"])]
        rss = {name: peak_rss_above_baseline(name, raw) for name in ("ours", "naive")}
    for name, label in (("naive", "naive reader (raw)"), ("ours", "our reader (raw)"), ("png", "our reader (PNG)")):
        report(f"{label:20} median {median(wall[name]):9.0f} images/s wall  {median(cpu[name]):9.0f} images/s CPU")
    report(
        f"median ratio ours/naive: {median(ratios):.2f} wall (pairs: {', '.join(f'{r:.2f}' for r in ratios)}), "
        f"{median(cpu_ratios):.2f} CPU time (target >= 3); {cpu_tag()}; {load()}"
    )
    report(
        f"peak RSS above the interpreter+imports baseline: ours {rss['ours']:.1f} MB, naive {rss['naive']:.1f} MB "
        f"(target for ours <= {1.5 * args.rows * 784 / 1e6:.1f} MB = 1.5 x the pixels)"
    )
    report.save(args.out)


if __name__ == "__main__":
    main()

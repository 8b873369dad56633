"""``.. results-plot:: KIND``: a figure drawn at docs build time from the files in ``bench/results/``.

A plot made by hand drifts from the numbers it shows; one drawn from the results files on every
build cannot. Each directive names the files it reads (``:files:``, relative to the
``results_dir`` setting, default ``bench/results``); a missing or unreadable file is an error
naming it, so a build with warnings as errors (``sphinx-build -W``) fails instead of drawing less.

Kinds:

``federation``   test accuracy per round, one line per ``history-*.csv`` (``bench/federation.py``)
``privacy``      accuracy against the privacy budget ε per node layout (``privacy-*.json``, ``bench/privacy.py``)
``throughput``   training images/s per CPU class, threads and loop (``<class>/train_throughput*.txt``)
"""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

PLOTS_DIR = "results-plots"  # under the build's doctree directory: never in the source tree


class ResultsError(ValueError):
    """A results file a plot needs is missing or does not hold what the plot reads."""


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise ResultsError(f"{path}: cannot read ({error.strerror or error})") from None


def federation_curves(files: list[Path]) -> tuple[str, list[tuple[str, list[int], list[float]]]]:
    """(title, [(label, rounds, test accuracy)]) from ``history-SETUP[TAG].csv`` files."""
    lines = []
    for path in files:
        rows = list(csv.DictReader(_read(path).splitlines()))
        try:
            rounds = [int(row["round"]) for row in rows]
            accuracy = [float(row["test_accuracy"]) for row in rows]
        except (KeyError, TypeError, ValueError) as error:
            raise ResultsError(f"{path}: expected columns round and test_accuracy ({error})") from None
        if not rows:
            raise ResultsError(f"{path}: no rounds")
        lines.append((path.stem.removeprefix("history-"), rounds, accuracy))
    return "Local federation: global test accuracy per round", lines


Layout = tuple[str, list[float], list[list[float]], float | None]
"""(label, budgets, each budget's run accuracies, the accuracy without DP or None)."""


def privacy_layouts(files: list[Path]) -> list[Layout]:
    """Per node layout of ``bench/privacy.py``'s ``accuracy`` rows: the budgets and their runs."""
    rows = []
    for path in files:
        try:
            rows += [(r["clients"], r["train_images_per_client"], r["budget"],
                      [float(run["test_accuracy"]) for run in r["runs"]]) for r in json.loads(_read(path))["accuracy"]]
        except (KeyError, TypeError, ValueError) as error:
            expected = "accuracy[].clients, .budget, .runs[].test_accuracy"
            raise ResultsError(f"{path}: expected {expected} ({error})") from None
    if not rows:
        raise ResultsError(f"{', '.join(map(str, files))}: no accuracy runs")
    layouts = []
    for clients in sorted({r[0] for r in rows}, reverse=True):
        mine = sorted((r for r in rows if r[0] == clients and r[2] is not None), key=lambda r: r[2])
        plain = [r[3][0] for r in rows if r[0] == clients and r[2] is None]
        images = next(r[1] for r in rows if r[0] == clients)
        label = "1 node (central)" if clients == 1 else f"{clients} nodes"
        layouts.append((f"{label}, {images:,} images each", [r[2] for r in mine], [r[3] for r in mine],
                        plain[0] if plain else None))
    return layouts


def draw_privacy(layouts: list[Layout], path: Path) -> None:
    """Accuracy against ε (log), the median of each budget's runs and their range; no DP dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    axes = fig.subplots()
    for label, budgets, runs, plain in layouts:
        medians = [statistics.median(r) for r in runs]
        line = axes.plot(budgets, medians, "-o", ms=4, label=label)[0]
        axes.fill_between(budgets, [min(r) for r in runs], [max(r) for r in runs], color=line.get_color(), alpha=0.2)
        if plain is not None:
            axes.axhline(plain, color=line.get_color(), lw=0.8, ls="--")
    axes.set_xscale("log")
    axes.minorticks_off()  # only the budgets measured are labelled
    budgets = sorted({b for layout in layouts for b in layout[1]})
    axes.set_xticks(budgets, [f"{b:g}" for b in budgets])
    axes.set(xlabel="privacy budget ε per node (δ 1e-5)", ylabel="global test accuracy", ylim=(0.0, 1.0),
             title="MNIST CNN under DP-SGD: accuracy against the budget (dashed: no DP)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    fig.savefig(path, dpi=90)


_THREADS = re.compile(r"^threads (\d+)", re.MULTILINE)
_PRECISION = re.compile(r"B precision \w+ -> (\w+)")
_MEDIAN = re.compile(r"^(A|B)(?: (fp32|bf16))?\b.*?\bmedian\s+(\d+) images/s wall", re.MULTILINE)


def throughput_bars(files: list[Path]) -> tuple[str, dict[str, dict[str, float]]]:
    """(title, {"<class> <n> thread(s)": {"reference" or "mnist-edge <precision>": images/s}})."""
    groups: dict[str, dict[str, float]] = {}
    for path in files:
        text = _read(path)
        threads = _THREADS.search(text)
        medians = _MEDIAN.findall(text)
        if threads is None or not medians:
            raise ResultsError(f"{path}: expected 'threads N' and 'A/B ... median N images/s wall' lines")
        header = _PRECISION.search(text)  # older reports: one B loop, its precision in the header
        bars = groups.setdefault(f"{path.parent.name}\n{threads.group(1)} thread(s)", {})
        for loop, variant, rate in medians:
            precision = variant or (header.group(1) if header else None)
            if loop == "B" and precision is None:
                raise ResultsError(f"{path}: a B median line names no precision (fp32, bf16)")
            bars["reference" if loop == "A" else f"mnist-edge {precision}"] = float(rate)
    return "Training throughput per CPU class (median images/s, wall clock)", groups


def draw_lines(title: str, lines: list[tuple[str, list[int], list[float]]], path: Path,
               ylim: tuple[float, float] = (0.0, 1.0), marks: tuple[float, ...] = ()) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    axes = fig.subplots()
    for label, x, y in lines:
        axes.plot(x, y, "-o", ms=3, label=label)
    for mark in marks:
        axes.axhline(mark, color="grey", lw=0.8, ls="--")
    axes.set(xlabel="round", ylabel="test_accuracy", title=title, ylim=ylim)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    fig.savefig(path, dpi=90)


def draw_bars(title: str, groups: dict[str, dict[str, float]], path: Path) -> None:
    from matplotlib.figure import Figure

    order = ["reference", "mnist-edge fp32", "mnist-edge bf16"]
    found = {name for bars in groups.values() for name in bars}
    names = [name for name in order if name in found] + sorted(found - set(order))
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    axes = fig.subplots()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [g + i * width for g, bars in enumerate(groups.values()) if name in bars]
        ys = [bars[name] for bars in groups.values() if name in bars]
        axes.bar(xs, ys, width, label=name)
    axes.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups), fontsize="small")
    axes.set(ylabel="images/s", title=title)
    axes.legend(fontsize="small")
    fig.savefig(path, dpi=90)


KINDS: dict[str, Callable[[list[Path], Path], None]] = {
    # Rounds 0 and 1 are below the frame: the rounds to 95 % and 97 % (dashed) are what differ.
    "federation": lambda files, out: draw_lines(*federation_curves(files), out, (0.85, 0.985), (0.95, 0.97)),
    "privacy": lambda files, out: draw_privacy(privacy_layouts(files), out),
    "throughput": lambda files, out: draw_bars(*throughput_bars(files), out),
}


def plot(kind: str, files: list[Path], out: Path) -> None:
    """Draw ``kind`` from ``files`` into the PNG ``out``; raises :class:`ResultsError`."""
    for path in files:
        if not path.is_file():
            raise ResultsError(f"{path}: no such results file")
    KINDS[kind](files, out)


class ResultsPlot(SphinxDirective):
    """The figure, drawn now from the named files, with a caption naming them."""

    required_arguments = 1
    has_content = True  # the caption
    option_spec: ClassVar[dict] = {"files": directives.unchanged_required}

    def run(self) -> list[nodes.Node]:
        kind = self.arguments[0]
        if kind not in KINDS:
            raise self.error(f"results-plot: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        results = Path(self.env.srcdir, self.config.results_dir).resolve()
        names = self.options.get("files", "").split()
        if not names:
            raise self.error("results-plot: :files: must name the results files the plot reads")
        out_dir = Path(self.env.doctreedir) / PLOTS_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"{kind}.png"
        try:
            plot(kind, [results / name for name in names], out)
        except ResultsError as error:
            raise self.error(f"results-plot {kind}: {error}") from None
        for name in names:
            self.env.note_dependency(str(results / name))
        doc_dir = Path(self.env.srcdir, self.env.docname).parent
        figure = nodes.figure()
        figure += nodes.image(uri=os.path.relpath(out, doc_dir), alt=f"{kind} plot")
        caption = nodes.caption()
        caption += nodes.Text(" ".join(self.content) + " " if self.content else "")
        caption += nodes.Text("Drawn at build time from bench/results/: " + ", ".join(names) + ".")
        figure += caption
        return [figure]


def setup(app: Sphinx) -> dict:
    app.add_config_value("results_dir", "../bench/results", "env")
    app.add_directive("results-plot", ResultsPlot)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

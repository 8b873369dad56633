"""Progress output: a tqdm bar on a terminal, a plain line about every 10 % anywhere else."""

from __future__ import annotations

import io

from tqdm import tqdm

from mnist_edge import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_plain_line_per_tenth_and_no_carriage_returns():
    log = io.StringIO()
    with progress.progress(24, "train", "batches", stream=log) as bar:
        for batch in range(24):
            if batch == 5:
                bar.set_postfix({"training_loss": 0.41234, "training_accuracy": 0.875})
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 10
    assert lines[0] == "train: 12 % (3/24 batches)"
    assert lines[-1] == "train: 100 % (24/24 batches) training_loss 0.4123 training_accuracy 0.8750"


def test_few_units_print_each_and_nothing_when_disabled_or_empty():
    log = io.StringIO()
    items = list(progress.track(["a", "b", "c"], 3, "round 1/5", "clients", stream=log))
    assert items == ["a", "b", "c"]
    assert log.getvalue().splitlines() == ["round 1/5: 33 % (1/3 clients)", "round 1/5: 66 % (2/3 clients)",
                                           "round 1/5: 100 % (3/3 clients)"]
    quiet = io.StringIO()
    assert list(progress.track(range(4), 4, "x", "clients", enabled=False, stream=quiet)) == [0, 1, 2, 3]
    with progress.progress(0, "predict", "batches", stream=quiet) as bar:
        bar.update(0)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    terminal = Terminal()
    with progress.progress(24, "train", "batches", stream=terminal) as bar:
        assert isinstance(bar, tqdm)
        bar.update(24)
    assert "\r" in terminal.getvalue()

"""Progress output that fits where it goes: a tqdm bar on a terminal, plain lines in a log.

A bar redraws itself with carriage returns, which a log file or a CI console keeps as one
ever-growing line; there a line about every 10 % (and one at the end) says the same thing.
The standalone ``train``/``predict`` commands and the local federation use this one module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import TextIO, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")


def say(line: str) -> None:
    """Print ``line`` in one write: ``print`` writes the text and the newline apart, so the ranks of a
    data-parallel job sharing one unbuffered stdout (``torchrun``) would run their lines together."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()
STEPS = 10
"""Plain output: one line per tenth of the work."""


class PlainProgress:
    """Progress as plain lines, ``desc: 30 % (57/189 batches) training_loss 0.4123``."""

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO) -> None:
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.done, self.reported, self.postfix = 0, 0, ""

    def update(self, count: int = 1) -> None:
        self.done += count
        step = self.done * STEPS // self.total if self.total > 0 else 0
        if step > self.reported:
            self.reported = step
            print(f"{self.desc}: {100 * self.done // self.total} % ({self.done}/{self.total} {self.unit})"
                  f"{self.postfix}", file=self.stream, flush=True)

    def set_postfix(self, values: Mapping[str, float]) -> None:
        """Shown on the next line printed (``on_metrics`` hooks pass the running metrics here)."""
        self.postfix = "".join(f" {key} {value:.4f}" for key, value in values.items())

    def close(self) -> None:
        return None

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class NoProgress(PlainProgress):
    """Progress nobody asked for (``--no-progress``)."""

    def __init__(self) -> None:
        super().__init__(0, "", "", sys.stderr)


def progress(total: int, desc: str, unit: str, enabled: bool = True,
             stream: TextIO | None = None) -> tqdm | PlainProgress:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else :class:`PlainProgress`.

    Both take ``update(n)``, ``set_postfix(dict)`` and work as context managers.
    """
    stream = stream if stream is not None else sys.stderr
    if not enabled or stream is None:
        return NoProgress()
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, leave=False, file=stream)
    return PlainProgress(total, desc, unit, stream)


def track(items: Iterable[Item], total: int, desc: str, unit: str, enabled: bool = True,
          stream: TextIO | None = None) -> Iterator[Item]:
    """``items``, reporting one unit of progress after each."""
    with progress(total, desc, unit, enabled, stream) as bar:
        for item in items:
            yield item
            bar.update(1)

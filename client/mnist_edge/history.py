"""A federation's record: one :class:`Round` per round, written as CSV, JSON, curves and the final model.

``simulate`` plays the server and fills the history; this module only writes it down, so the
files a run leaves (``history.csv``, ``history.json``, ``curves.png``, ``global.npz``/``.pth``)
have one definition.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import model
from .files import atomic_write
from .report import json_safe

HISTORY_FIELDS = ("round", "clients", "training_loss", "test_loss", "test_accuracy", "seconds",
                  "dp_epsilon_round", "dp_epsilon_spent", "refused")

@dataclass
class Round:
    """One row of the history; round 0 is the initial model before any training."""

    round: int
    clients: list[int]
    training_loss: float | None  # mean over the round's clients, weighted by num_examples
    test_loss: float
    test_accuracy: float  # on the union of all clients' test splits
    seconds: float
    client_test_accuracy: dict[str, float] = field(default_factory=dict)
    dp_epsilon_round: float | None = None  # DP rounds: the largest over the round's clients
    dp_epsilon_spent: float | None = None  # DP rounds: the largest total ε any client has spent
    refused: list[int] = field(default_factory=list)  # clients whose privacy budget refused the round


def row_text(entry: Round) -> str:
    """One round as the line `simulate` prints (the loss, accuracy, seconds, ε and refusals)."""
    loss = "-" if entry.training_loss is None else f"{entry.training_loss:.4f}"
    line = f"{entry.round:>5}  {loss:>13}  {entry.test_accuracy:>13.4f}  {entry.seconds:>7.1f}"
    if entry.dp_epsilon_spent is not None:
        line += f"  epsilon spent {entry.dp_epsilon_spent:.3f} (+{entry.dp_epsilon_round:.3f} this round)"
    return line + (f"  refused: {' '.join(map(str, entry.refused))}" if entry.refused else "")


def write_outputs(out: Path, history: list[Round], params: list[np.ndarray], config: dict[str, Any]) -> None:
    """history.csv / history.json, curves.png, and the final model as global.npz and global.pth."""
    names = sorted(history[0].client_test_accuracy, key=lambda n: int(n.split("-")[1]))

    def rows(handle) -> None:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([*HISTORY_FIELDS, *(f"test_accuracy_{n}" for n in names)])
        for h in history:
            writer.writerow([h.round, " ".join(map(str, h.clients)), _num(h.training_loss), _num(h.test_loss),
                             _num(h.test_accuracy), f"{h.seconds:.2f}", _num(h.dp_epsilon_round),
                             _num(h.dp_epsilon_spent), " ".join(map(str, h.refused)),
                             *(_num(h.client_test_accuracy[n]) for n in names)])

    atomic_write(out / "history.csv", rows)
    text = json.dumps(json_safe({"config": config, "rounds": [asdict(h) for h in history]}), indent=2) + "\n"
    atomic_write(out / "history.json", lambda handle: handle.write(text))
    plot_curves(history, out / "curves.png")
    model.save_npz(params, out / "global.npz")
    model.save_pth(params, out / "global.pth")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"  # NaN is written as "nan"


def plot_curves(history: list[Round], path: Path) -> Path:
    """Accuracy (global and per client) and loss (training and global test) against the round."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    private = [h for h in history if h.dp_epsilon_spent is not None]
    fig = Figure(figsize=(15 if private else 10, 4), layout="constrained")
    panels = fig.subplots(1, 3 if private else 2)
    acc, loss = panels[:2]
    rounds = [h.round for h in history]
    names = list(history[0].client_test_accuracy)
    for name in names:
        label = name if len(names) <= 10 else None
        acc.plot(rounds, [h.client_test_accuracy[name] for h in history], lw=0.8, alpha=0.5, label=label)
    acc.plot(rounds, [h.test_accuracy for h in history], "k-o", lw=2, ms=3, label="global (all test splits)")
    acc.set(xlabel="round", ylabel="test_accuracy", title="Global model accuracy", ylim=(0, 1))
    acc.legend(fontsize="small")
    trained = [h for h in history if h.training_loss is not None]
    loss.plot([h.round for h in trained], [h.training_loss for h in trained], "-o", ms=3,
              label="training_loss (clients)")
    loss.plot(rounds, [h.test_loss for h in history], "-o", ms=3, label="test_loss (global)")
    loss.set(xlabel="round", ylabel="loss (NLL)", title="Loss", yscale="log")
    loss.legend(fontsize="small")
    if private:
        spent = panels[2]
        spent.bar([h.round for h in private], [h.dp_epsilon_round for h in private], alpha=0.4,
                  label="epsilon of the round")
        spent.plot([h.round for h in private], [h.dp_epsilon_spent for h in private], "k-o", ms=3,
                   label="epsilon spent (composed)")
        spent.set(xlabel="round", ylabel="epsilon (largest over the clients)", title="Privacy spent")
        spent.legend(fontsize="small")
    for axes in panels:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100), mode="wb")

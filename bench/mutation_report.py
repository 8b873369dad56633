"""The report of a `make mutate` run: the score per module and every mutant that was not killed.

Run by the Makefile in mutmut's working copy (``build/mutate``), after ``mutmut run``. A mutant
that no selected test kills is listed with its diff; one listed in ``bench/mutation_equivalents.txt``
(by its function and its mutated line, which survive renumbering) is shown with the reason it
changes nothing observable, and set aside from the score. Mutants the run did not reach (an
interrupted or partial run) are counted as "not run", outside the score. Exit status 1 when an
unexplained survivor is left or a mutant was not run, so neither can slip into the report unnoticed.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

EQUIVALENTS = Path(__file__).with_name("mutation_equivalents.txt")
DETECTED = ("killed", "timeout", "segfault")
NOT_RUN = "not checked"


@dataclass
class Mutant:
    name: str  # mnist_edge.settings.x__valid__mutmut_6
    module: str  # shards/reader.py
    status: str
    diff: str

    @property
    def function(self) -> str:
        """``module.function`` (``Class.method`` for methods), without mutmut's mangling."""
        mangled = self.name.rpartition("__mutmut_")[0].rpartition(".")[2]
        plain = mangled.removeprefix("x_").replace("xǁ", "").replace("ǁ", ".")
        return f"{self.module}:{plain.lstrip('.')}"

    @property
    def mutated_lines(self) -> list[str]:
        return [
            line[1:].strip() for line in self.diff.splitlines() if line.startswith("+") and not line.startswith("+++")
        ]


def load_equivalents(path: Path) -> dict[tuple[str, str], str]:
    """``function | mutated line | reason`` per line; ``#`` comments."""
    known = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(" | ")]
        if len(parts) != 3:
            raise SystemExit(f"{path}:{number}: expected 'function | mutated line | reason'")
        known[(parts[0], parts[1])] = parts[2]
    return known


def load_mutants() -> list[Mutant]:
    root = Path(config().source_paths[0])  # src/mnist_edge
    mutants = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        module = path.relative_to(root).as_posix()
        for name, exit_code in data.exit_code_by_key.items():
            status = status_by_exit_code[exit_code]
            diff = "" if status in DETECTED or status == NOT_RUN else get_diff_for_mutant(name, path=path)
            mutants.append(Mutant(name, module, status, diff))
    return mutants


def equivalent_reason(mutant: Mutant, known: dict[tuple[str, str], str]) -> str | None:
    lines = mutant.mutated_lines or [""]  # a deleted line leaves no "+" line
    for line in lines:
        reason = known.get((mutant.function, line))
        if reason:
            return reason
    return None


def report(mutants: list[Mutant], known: dict[tuple[str, str], str], header: str) -> tuple[str, int]:
    out = [header, ""]
    rows = []
    unexplained, equivalent = [], []
    by_module: dict[str, Counter] = {}
    for m in mutants:
        counts = by_module.setdefault(m.module, Counter())
        counts["mutants"] += 1
        if m.status == NOT_RUN:  # an interrupted or partial run: neither killed nor survived
            counts["not run"] += 1
            continue
        if m.status in DETECTED:
            counts["killed"] += 1
            continue
        reason = equivalent_reason(m, known)
        if reason:
            counts["equivalent"] += 1
            equivalent.append((m, reason))
        else:
            counts["not killed"] += 1
            unexplained.append(m)
    total = sum(by_module.values(), Counter())
    for module, c in [*sorted(by_module.items()), ("all", total)]:
        run = c["mutants"] - c["not run"]
        score = c["killed"] / max(run - c["equivalent"], 1)
        rows.append(
            f"{module:<22} {c['mutants']:>7} {c['not run']:>7} {c['killed']:>7} {c['equivalent']:>10} "
            f"{c['not killed']:>10} {c['killed'] / max(run, 1):>8.1%} {score:>10.1%}"
        )
    out += [
        f"{'module':<22} {'mutants':>7} {'not run':>7} {'killed':>7} {'equivalent':>10} {'not killed':>10} "
        f"{'killed':>8} {'score':>10}",
        *rows,
        "",
        "killed: a selected test failed (or timed out), as a share of the mutants run; score: killed /",
        "(mutants run - equivalent). not run: mutants this run did not reach (see the header).",
        "",
    ]
    out.append(f"Not killed and not explained: {len(unexplained)}")
    for m in unexplained:
        out += [f"  {m.name} ({m.status})", *("    " + line for line in m.diff.splitlines()[2:])]
    out += ["", f"Equivalent (survive every test because nothing observable changes): {len(equivalent)}"]
    for m, reason in equivalent:
        changed = "; ".join(m.mutated_lines) or "(line deleted)"
        out.append(f"  {m.function}: {changed}\n      why: {reason}")
    return "\n".join(out) + "\n", len(unexplained) + total["not run"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=int, help="how long `mutmut run` took (for the header)")
    parser.add_argument("--note", default="", help="a line for the header (e.g. how a partial run was made)")
    args = parser.parse_args()
    took = f", {args.seconds // 60} min {args.seconds % 60} s" if args.seconds else ""
    header = (
        f"Mutation testing: `make mutate` (mutmut {version('mutmut')}, one worker{took}), "
        f"against the fast unit tests in pyproject.toml [tool.mutmut]." + (f"\n{args.note}" if args.note else "")
    )
    text, unexplained = report(load_mutants(), load_equivalents(EQUIVALENTS), header)
    args.out.write_text(text, encoding="utf-8")
    print(re.search(r"^all .*$", text, re.M).group(0))
    print(f"report: {args.out}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())

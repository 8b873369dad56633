"""The mutation report: one part's results saved, then every part merged into one score per module.

``make mutate MODULES=...`` (bench/mutate.py) runs mutmut over some modules in a copy of its own,
then ``collect`` (run in that copy) saves every mutant's status to
``bench/results/mutation-<part>.json``, and ``merge`` joins all saved parts into
``bench/results/mutation.txt``: per module the mutants, how many were not run, killed, equivalent
and not killed, and every survivor with its diff. A survivor listed in
``bench/mutation_equivalents.txt`` (by its function and its mutated line, which survive
renumbering) is shown with the reason it changes nothing observable, and set aside from the score.

A module of the selection (pyproject ``[tool.mutmut] only_mutate``) that no part has run is
"not run" as a whole; a part whose module has changed since it ran is "stale" (its numbers are
shown, but they are of other code). ``merge`` exits 1 while any survivor is unexplained, any
mutant not run or any module stale, so none can slip into the report unnoticed.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "client" / "mnist_edge"
RESULTS = REPO / "bench" / "results"
EQUIVALENTS = Path(__file__).with_name("mutation_equivalents.txt")
SOURCE_ROOT = "src/mnist_edge/"  # where the copy holds the package ([tool.mutmut] source_paths)
DETECTED = ("killed", "timeout", "segfault")
NOT_RUN = "not checked"


def mutmut_config(pyproject: Path = REPO / "pyproject.toml") -> dict:
    return tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["mutmut"]


def selected_patterns() -> list[str]:
    """The selection, relative to the package: ``shards/*``, ``training.py``, ..."""
    return [pattern.removeprefix(SOURCE_ROOT) for pattern in mutmut_config()["only_mutate"]]


def selected_tests() -> list[str]:
    return [t for t in mutmut_config()["pytest_add_cli_args_test_selection"] if t.startswith("tests/")]


def package_modules(patterns: list[str]) -> list[str]:
    """The package's module files (``shards/reader.py``) that ``patterns`` select, sorted."""
    files = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    return [f for f in files if any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]


def source_sha256(module: str) -> str:
    return hashlib.sha256((PACKAGE / module).read_bytes()).hexdigest()


def function_of(name: str, module: str) -> str:
    """``module:function`` (``Class.method`` for methods) of a mutant, without mutmut's mangling."""
    mangled = name.rpartition("__mutmut_")[0].rpartition(".")[2]
    plain = mangled.removeprefix("x_").replace("xǁ", "").replace("ǁ", ".")
    return f"{module}:{plain.lstrip('.')}"


def mutated_lines(diff: str) -> list[str]:
    return [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]


# -- collect: in mutmut's copy, after `mutmut run` ---------------------------------------------------


def collect(part: str, seconds: int, children: int, kind: str, out: Path) -> dict:
    """Every mutant of this copy's run, with the diff of each one not detected; appended run times."""
    from importlib.metadata import version

    from mutmut.configuration import config
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    root = Path(config().source_paths[0])
    mutants, modules = [], []
    for path in walk_mutatable_files():
        module = path.relative_to(root).as_posix()
        modules.append(module)
        data = SourceFileMutationData(path=path)
        data.load()
        for name, exit_code in sorted(data.exit_code_by_key.items()):
            status = status_by_exit_code[exit_code]
            diff = "" if status in DETECTED or status == NOT_RUN else get_diff_for_mutant(name, path=path)
            mutants.append({"name": name, "module": module, "function": function_of(name, module),
                            "status": status, "diff": diff})
    previous = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    runs = previous.get("runs", []) if previous.get("modules") == sorted(modules) and kind != "full" else []
    runs.append({"kind": kind, "seconds": seconds, "children": children,
                 "finished": datetime.now(UTC).isoformat(timespec="seconds")})
    tests = [item for item in config().pytest_add_cli_args_test_selection if item.startswith("tests/")]
    record = {"part": part, "modules": sorted(modules), "mutmut": version("mutmut"), "tests": tests,
              "sources": {m: hashlib.sha256((root / m).read_bytes()).hexdigest() for m in sorted(modules)},
              "runs": runs, "mutants": mutants}
    write_atomically(out, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return record


# -- merge: anywhere, from the saved parts -----------------------------------------------------------


@dataclass(eq=False)  # hashed by identity: a part is one saved file
class Part:
    path: Path
    record: dict

    @property
    def finished(self) -> str:
        return self.record["runs"][-1]["finished"]

    def stale(self, module: str) -> bool:
        return not (PACKAGE / module).is_file() or self.record["sources"][module] != source_sha256(module)


def load_parts(folder: Path = RESULTS) -> list[Part]:
    return [Part(p, json.loads(p.read_text(encoding="utf-8"))) for p in sorted(folder.glob("mutation-*.json"))]


def load_equivalents(path: Path = EQUIVALENTS) -> dict[tuple[str, str], str]:
    """``function | mutated line | reason`` per line; ``#`` comments."""
    known = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        function, _, rest = line.partition(" | ")
        mutated, _, reason = rest.rpartition(" | ")  # a mutated line may hold " | " itself, a reason may not
        if not (function.strip() and mutated.strip() and reason.strip()):
            raise SystemExit(f"{path}:{number}: expected 'function | mutated line | reason'")
        known[(function.strip(), mutated.strip())] = reason.strip()
    return known


def equivalent_reason(mutant: dict, known: dict[tuple[str, str], str], used: set | None = None) -> str | None:
    for line in mutated_lines(mutant["diff"]) or [""]:  # a deleted line leaves no "+" line
        reason = known.get((mutant["function"], line))
        if reason:
            if used is not None:
                used.add((mutant["function"], line))
            return reason
    return None


def latest_parts(parts: list[Part]) -> dict[str, Part]:
    """For each module, the part that ran it last."""
    chosen: dict[str, Part] = {}
    for part in sorted(parts, key=lambda p: p.finished):
        for module in part.record["modules"]:
            chosen[module] = part
    return chosen


def minutes(seconds: int) -> str:
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60} s"


def merge(parts: list[Part], known: dict[tuple[str, str], str], selection: list[str],
          all_tests: list[str]) -> tuple[str, int]:
    """The report text and the count of problems (unexplained survivors, mutants not run, stale modules).

    ``all_tests``: the test selection of pyproject.toml; a part run against fewer says which.
    """
    chosen = latest_parts(parts)
    rows, unexplained, equivalent, stale, unrun, used = [], [], [], [], [], set()
    total = Counter()
    for module in selection:
        part = chosen.get(module)
        if part is None:
            unrun.append(module)
            rows.append(f"{module:<22} {'-':>7} {'all':>7} {'-':>7} {'-':>10} {'-':>10} {'-':>8} {'-':>10}  no part")
            continue
        c = Counter()
        for m in (m for m in part.record["mutants"] if m["module"] == module):
            c["mutants"] += 1
            if m["status"] == NOT_RUN:
                c["not run"] += 1
            elif m["status"] in DETECTED:
                c["killed"] += 1
            elif reason := equivalent_reason(m, known, used):
                c["equivalent"] += 1
                equivalent.append((m, reason))
            else:
                c["not killed"] += 1
                unexplained.append(m)
        note = part.record["part"] + (", STALE: the module changed since" if part.stale(module) else "")
        if part.stale(module):
            stale.append(module)
        rows.append(row(module, c) + f"  {note}")
        total += c
    rows.append(row("all", total))
    times = [f"  {p.record['part']}: {', '.join(p.record['modules'])}; "
             + "; ".join(f"{r['kind']} {minutes(r['seconds'])} ({r['children']} worker{'s' * (r['children'] > 1)}, "
                         f"{r['finished'][:10]})" for r in p.record["runs"])
             + (f"\n      tests: {' '.join(t.removeprefix('tests/') for t in p.record['tests'])}"
                if sorted(p.record["tests"]) != sorted(all_tests) else "")
             for p in sorted(set(chosen.values()), key=lambda p: p.record["part"])]
    out = ["Mutation testing: `make mutate` (bench/mutate.py, mutmut "
           + ", ".join(sorted({p.record["mutmut"] for p in parts}) or ["-"])
           + ") of the modules in pyproject.toml [tool.mutmut], against the fast in-process tests listed there.",
           "Parts (make mutate MODULES=...; run time of `mutmut run`):", *times, "",
           f"{'module':<22} {'mutants':>7} {'not run':>7} {'killed':>7} {'equivalent':>10} {'not killed':>10} "
           f"{'killed':>8} {'score':>10}  part", *rows, "",
           "killed: a selected test failed (or timed out), as a share of the mutants run; score: killed /",
           "(mutants run - equivalent). not run: mutants no part has run (a module without a part: all).", ""]
    if unrun or stale:
        out += [f"Not run yet: {', '.join(unrun) or 'none'}. Stale (changed since their part ran): "
                f"{', '.join(stale) or 'none'}.", ""]
    out.append(f"Not killed and not explained: {len(unexplained)}")
    for m in unexplained:
        out += [f"  {m['name']} ({m['status']})", *("    " + line for line in m["diff"].splitlines()[2:])]
    out += ["", f"Equivalent (survive every test because nothing observable changes): {len(equivalent)}"]
    for m, reason in equivalent:
        changed = "; ".join(mutated_lines(m["diff"])) or "(line deleted)"
        out.append(f"  {m['function']}: {changed}\n      why: {reason}")
    current = {module for module, part in chosen.items() if not part.stale(module)}
    unused = [key for key in known if key not in used and key[0].partition(":")[0] in current]
    if unused:
        out += ["", f"Entries of bench/mutation_equivalents.txt no survivor of a current part matches (remove them): "
                f"{len(unused)}", *(f"  {function} | {line}" for function, line in unused)]
    return "\n".join(out) + "\n", len(unexplained) + total["not run"] + len(unrun) + len(stale)


def row(module: str, c: Counter) -> str:
    if not c["mutants"]:  # a module of imports only
        return f"{module:<22} {0:>7} {0:>7} {0:>7} {0:>10} {0:>10} {'-':>8} {'-':>10}"
    run = c["mutants"] - c["not run"]
    score = c["killed"] / max(run - c["equivalent"], 1)
    return (f"{module:<22} {c['mutants']:>7} {c['not run']:>7} {c['killed']:>7} {c['equivalent']:>10} "
            f"{c['not killed']:>10} {c['killed'] / max(run, 1):>8.1%} {score:>10.1%}")


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    saving = commands.add_parser("collect", help="save this copy's results (run in mutmut's copy)")
    saving.add_argument("--part", required=True)
    saving.add_argument("--seconds", type=int, required=True, help="how long `mutmut run` took")
    saving.add_argument("--children", type=int, default=1)
    saving.add_argument("--kind", choices=["full", "resume", "recheck"], default="full")
    saving.add_argument("--out", type=Path, required=True)
    merging = commands.add_parser("merge", help="join every saved part into one report")
    merging.add_argument("--out", type=Path, default=RESULTS / "mutation.txt")
    args = parser.parse_args()
    if args.command == "collect":
        record = collect(args.part, args.seconds, args.children, args.kind, args.out)
        counts = Counter(m["status"] for m in record["mutants"])
        print(f"{args.part}: {len(record['mutants'])} mutants, {dict(counts)}; saved {args.out}")
        return 0
    text, problems = merge(load_parts(), load_equivalents(), package_modules(selected_patterns()),
                           selected_tests())
    write_atomically(args.out, text)
    print(next(line for line in text.splitlines() if line.startswith("all ")))
    print(f"report: {args.out}" + (f" ({problems} problems: unexplained, not run or stale)" if problems else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

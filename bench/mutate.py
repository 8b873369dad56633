"""One part of the mutation test: ``make mutate MODULES="shards/reader.py training.py"``.

mutmut 3 finds a package only under ./, src/ or source/ and mutates what ``only_mutate`` selects,
so each part runs in a copy of its own, ``build/mutate/<part>/``: the package as
``src/mnist_edge``, ``tests/``, the compute package's other files (the edge tests start it) and a
``pyproject.toml`` whose ``only_mutate`` names this part's modules only. Parts can run one after
another or side by side; each saves ``bench/results/mutation-<part>.json`` and the report
``bench/results/mutation.txt`` is merged from all of them (bench/mutation_report.py).

``--resume`` continues an interrupted part (the copy's finished mutants are kept); ``--recheck``
runs a finished part's survivors again against the current tests (after a test was added).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from mutation_report import PACKAGE, REPO, RESULTS, SOURCE_ROOT, package_modules, selected_patterns

COPIES = REPO / "build" / "mutate"
CLIENT_FILES = ("startup.py", "build.py", "scaleout.yaml", "python_env.yaml")


def part_modules(asked: list[str]) -> tuple[str, list[str]]:
    """(the part's name, its patterns); every pattern must name selected modules."""
    selection = selected_patterns()
    if not asked:
        return "all", selection
    for pattern in asked:
        found = package_modules([pattern])
        if not found:
            raise SystemExit(f"MODULES: {pattern!r} names no module of client/mnist_edge")
        outside = [m for m in found if m not in package_modules(selection)]
        if outside:
            raise SystemExit(f"MODULES: {', '.join(outside)} not in pyproject.toml [tool.mutmut] only_mutate")
    name = "+".join(p.removesuffix(".py").removesuffix("/*").replace("/", "-").replace("*", "") for p in asked)
    return name, asked


def toml_list(name: str, items: list[str]) -> str:
    return f"{name} = [\n" + "".join(f"    {json.dumps(item)},\n" for item in items) + "]"


def pyproject_for(patterns: list[str], tests: list[str]) -> str:
    """The repository's pyproject.toml with ``only_mutate`` narrowed to ``patterns`` and, if ``tests``
    are given, the test selection narrowed to them (its -m and -k options kept)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    selection = tomllib.loads(text)["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]
    files = {item.split("::")[0] for item in selection if item.startswith("tests/")}
    outside = [test for test in tests if test.split("::")[0] not in files]
    if outside:
        raise SystemExit(f"TESTS: {', '.join(outside)} not in pyproject.toml's mutation test selection")
    if tests:
        selection = tests + [item for item in selection if not item.startswith("tests/")]
    for name, items in (("only_mutate", [SOURCE_ROOT + p for p in patterns]),
                        ("pytest_add_cli_args_test_selection", selection)):
        replacement = toml_list(name, items)
        text, count = re.subn(rf"^{name} = \[\n(?:.*\n)*?\]", lambda _, new=replacement: new, text,
                              count=1, flags=re.M)
        if count != 1:
            raise SystemExit(f"pyproject.toml: no {name} = [...] list in [tool.mutmut]")
    return text


def refresh_copy(copy: Path, patterns: list[str], tests: list[str], fresh: bool) -> None:
    """The copy mutmut runs in; on resume the sources and tests are refreshed, mutmut's results kept."""
    if fresh and copy.exists():
        shutil.rmtree(copy)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PACKAGE, copy / "src" / "mnist_edge", ignore=ignore, dirs_exist_ok=True)
    shutil.copytree(REPO / "tests", copy / "tests", ignore=ignore, dirs_exist_ok=True)
    (copy / "client").mkdir(exist_ok=True)
    for name in CLIENT_FILES:
        shutil.copy2(REPO / "client" / name, copy / "client" / name)
    (copy / "pyproject.toml").write_text(pyproject_for(patterns, tests), encoding="utf-8")


def survivors(saved: Path) -> list[str]:
    record = json.loads(saved.read_text(encoding="utf-8"))
    return [m["name"] for m in record["mutants"] if m["status"] not in ("killed", "timeout", "segfault")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default="", help="modules of the selection, relative to client/mnist_edge")
    parser.add_argument("--tests", default="", help="narrow the test selection to these files or test ids")
    parser.add_argument("--children", type=int, default=1, help="mutmut workers (1 on a shared machine)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true", help="continue this part's interrupted run")
    how.add_argument("--recheck", action="store_true", help="run this part's survivors again")
    args = parser.parse_args()
    part, patterns = part_modules(args.modules.split())
    copy, saved = COPIES / part, RESULTS / f"mutation-{part}.json"
    again = args.resume or args.recheck
    if again and not (copy / "mutants").is_dir():
        raise SystemExit(f"{copy}: no run of part {part!r} to continue (run it without --resume/--recheck)")
    names = survivors(saved) if args.recheck else []
    if args.recheck and not names:
        print(f"{part}: no survivors to recheck")
    refresh_copy(copy, patterns, args.tests.split(), fresh=not again)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.children), *names]
    print(f"part {part}: {' '.join(patterns)} in {copy.relative_to(REPO)} (log: mutmut.log)", flush=True)
    start = time.monotonic()
    with open(copy / "mutmut.log", "a", encoding="utf-8") as log:
        done = subprocess.run(command, cwd=copy, env=environment, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = round(time.monotonic() - start)
    if done.returncode != 0:
        print(f"mutmut run exited {done.returncode} after {seconds} s: see {copy / 'mutmut.log'}", file=sys.stderr)
    kind = "recheck" if args.recheck else "resume" if args.resume else "full"
    report = Path(__file__).with_name("mutation_report.py")
    subprocess.run([sys.executable, str(report), "collect", "--part", part, "--seconds", str(seconds),
                    "--children", str(args.children), "--kind", kind, "--out", str(saved)], cwd=copy, check=True)
    merged = subprocess.run([sys.executable, str(report), "merge"], check=False)
    return done.returncode or merged.returncode


if __name__ == "__main__":
    sys.exit(main())

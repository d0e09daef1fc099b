"""Every figure the README quotes, traced to the results file that holds it.

``benchmarks/results/readme_numbers.yaml`` lists README passages (matched with
whitespace collapsed) and, for each figure in a passage in order, how to get
it from the passage's results file (a Python expression over ``d``, the
file's JSON), or why it is not a measurement (``external: ...``: a config
value, a goal, a published figure), or ``unbacked: ...`` for a figure whose
run left no results file yet (counted and listed, never silently passed).
A passage may instead name a text file whose lines it must reproduce
(``same_lines_as``, the demo's console).

``check()`` returns every problem: a passage not in the README, a figure
that differs from its file at the digits quoted, a figure in the README that
no passage covers, a results file no script writes. The test
``tests/test_readme_numbers.py`` runs it; ``python benchmarks/readme_numbers.py``
prints the map (figure, file, script) and the unbacked list.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REGISTRY = RESULTS / "readme_numbers.yaml"

# A figure: a decimal (0.7241, 1.05, 2.5) or a power of ten (1.5e-6, 5e-8).
# A sign written right before it ("−0.003", "+0.0812") is part of the figure.
FIGURE = re.compile(r"(?<![\w.])[−+]?(?:\d+\.\d+(?:e-\d+)?|\d+e-\d+)(?!\w|\.\d)")
EXPR_GLOBALS = {"math": math, "re": re, "max": max, "min": min, "abs": abs, "sum": sum}


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def formats_to(value: float, figure: str) -> bool:
    """Whether ``value`` written with the figure's precision is the figure; a
    figure with a sign (``−`` or ``+``) must have it, one without is compared
    unsigned (a difference written as "by 4.5 points")."""
    if figure[0] in "−+":
        sign, figure = figure[0], figure[1:]
        if (value < 0) != (sign == "−"):
            return False
    if "e-" in figure:
        mant, exp = figure.split("e-")
        digits = len(mant.split(".")[1]) if "." in mant else 0
        got = f"{abs(value):.{digits}e}"
        gm, ge = got.split("e")
        return gm == mant and int(ge) == -int(exp)
    digits = len(figure.split(".")[1])
    return f"{abs(value):.{digits}f}" == figure


@dataclass
class Traced:
    figure: str
    file: str
    script: str | None
    how: str


def _load(name: str, cache: dict) -> dict:
    if name not in cache:
        cache[name] = json.loads((RESULTS / name).read_text())
    return cache[name]


def check(
    readme: str | None = None, registry: list | None = None
) -> tuple[list[str], list[Traced]]:
    """Problems found, and the traced figures (unbacked ones with file ``-``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _results import WRITERS

    text = normalise(readme if readme is not None else (ROOT / "README.md").read_text())
    entries = registry if registry is not None else yaml.safe_load(REGISTRY.read_text())
    problems: list[str] = []
    traced: list[Traced] = []
    covered: set[int] = set()
    cache: dict = {}
    for e in entries:
        passage = normalise(" ".join(e["lines"]) if "same_lines_as" in e else e["readme"])
        starts = [m.start() for m in re.finditer(re.escape(passage), text)]
        if not starts:
            problems.append(f"passage not in the README: {passage[:90]!r}")
            continue
        spans = [(m.start() + s, m.group()) for s in starts for m in FIGURE.finditer(passage)]
        covered.update(p for p, _ in spans)
        found = [m.group() for m in FIGURE.finditer(passage)]
        if "same_lines_as" in e:
            lines = {
                normalise(x).strip()
                for x in (RESULTS / e["same_lines_as"]).read_text().splitlines()
            }
            for line in e["lines"]:
                if normalise(line).strip() not in lines:
                    problems.append(f"{e['same_lines_as']} has no line {line!r}")
            traced += [
                Traced(f, e["same_lines_as"], WRITERS.get(e["same_lines_as"]), "line")
                for f in found
            ]
            continue
        figures = [(str(f), str(how)) for f, how in e["figures"]]
        if [f for f, _ in figures] != found:
            problems.append(
                f"figures {found} in {passage[:60]!r}... but the registry lists {[f for f, _ in figures]}"
            )
            continue
        name = e.get("file")
        for fig, how in figures:
            if how.startswith(("external:", "unbacked:")):
                traced.append(Traced(fig, "-", None, how))
                continue
            if name is None:
                problems.append(f"{fig}: no results file for {passage[:60]!r}")
                continue
            if name not in WRITERS:
                problems.append(
                    f"{name}: no script is known to write it (benchmarks/_results.py WRITERS)"
                )
            bound = how.startswith("<=")
            try:
                value = float(
                    eval(how.removeprefix("<=").strip(), EXPR_GLOBALS, {"d": _load(name, cache)})
                )  # noqa: S307
            except Exception as err:  # noqa: BLE001 - reported as a problem
                problems.append(f"{fig}: {name}: {how} fails: {err!r}")
                continue
            ok = value <= float(fig) if bound else formats_to(value, fig)
            if not ok:
                problems.append(
                    f"README says {fig} ({passage[:50]!r}...), {name} gives {value!r} for {how}"
                )
            traced.append(Traced(fig, name, WRITERS.get(name), how))
    for m in FIGURE.finditer(text):
        if m.start() not in covered:
            ctx = text[max(0, m.start() - 40) : m.end() + 20]
            problems.append(f"README figure {m.group()} is in no registry passage: ...{ctx}...")
    return problems, traced


def main() -> int:
    problems, traced = check()
    for t in traced:
        print(f"{t.figure:>9}  {t.file:28s} {t.script or '-':38s} {t.how}")
    unbacked = [t for t in traced if t.how.startswith("unbacked:")]
    print(f"\n{len(traced)} figures; {len(unbacked)} unbacked; {len(problems)} problems")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

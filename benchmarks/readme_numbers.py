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

Whole numbers are figures too when they are measurements by their form (see
``WHOLE_UNIT`` and ``WHOLE_CELL``): an integer (thousands grouped with commas
or not) followed by a unit of measure, or a table cell that holds only
integers. A passage lists them under ``whole`` (same pairs, same rules) and
``figures`` holds its decimals; an integer that is a setting ("128 tokens",
"40 steps") is matched like a measurement and gets an ``external:`` reason.
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

# A whole number: digits, thousands optionally grouped by commas ("1,222"),
# not part of a word, a decimal, a version or a hyphenated name ("ZeRO-2",
# "PQ64x8", "2.13.0"); a sign written right before it is part of it.
_INT = r"[−+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?!\w|[.,]\d)"
# Units of measure: time, size, a share or ratio, a rate (anything per
# second), or a count of work done (steps, tokens, passages, ...).
UNITS = (
    r"(?:ms|s|min|minutes?|h|hours?|seconds?|bytes|[KMGT]i?B|[A-Za-z]+/s"
    r"|steps|tokens|passages|pairs|queries|vectors|shards|batches|words|points)"
    r"(?![\w/])"
)
# (1) Integers followed by a unit, the unit also naming every integer of a
# list before it: "9 s", "40%", "4×", "863 passages/s", "482 / 762 / 819 MiB",
# "2 of 5 shards", "50,880 of 100,000 passages".
WHOLE_UNIT = re.compile(
    rf"(?<![\w.,/−+-])({_INT}(?:(?: ?/ ?| of |–){_INT})*)(?: ?{UNITS}|(?=%|×|x(?!\w)))"
)
# (2) A table cell of integers alone, or of integers separated by " / ": a
# results column such as "minutes" or "steps / tokens / min".
WHOLE_CELL = re.compile(rf"(?<=\|) ?({_INT}(?: ?/ ?{_INT})*) ?(?=\|)")


def whole_figures(text: str) -> list[tuple[int, str]]:
    """(position, figure) of every whole-number figure of ``text`` (normalised)."""
    found: dict[int, str] = {}
    for rule in (WHOLE_UNIT, WHOLE_CELL):
        for m in rule.finditer(text):
            for n in re.finditer(_INT, m.group(1)):
                found[m.start(1) + n.start()] = n.group()
    return sorted(found.items())


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
    if FIGURE.fullmatch(figure) is None:  # a whole number: "9", "1,222"
        return f"{abs(value):{',' if ',' in figure else ''}.0f}" == figure
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
    whole: bool = False  # a whole number (``whole_figures``), not a decimal


def _load(name: str, cache: dict) -> dict:
    if name not in cache:
        cache[name] = json.loads((RESULTS / name).read_text())
    return cache[name]


def _number(figure: str) -> float:
    return float(figure.replace("−", "-").replace(",", ""))


def check(
    readme: str | None = None, registry: list | None = None
) -> tuple[list[str], list[Traced]]:
    """Problems found, and the traced figures (unbacked ones with file ``-``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _results import WRITERS

    text = normalise(readme if readme is not None else (ROOT / "README.md").read_text())
    entries = registry if registry is not None else yaml.safe_load(REGISTRY.read_text())
    wholes = whole_figures(text)
    problems: list[str] = []
    traced: list[Traced] = []
    covered: set[int] = set()
    covered_whole: set[int] = set()
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
        # Whole numbers are found in the README itself (their rule looks at
        # what follows and at table cells), then assigned to the passage.
        in_span = [[(p, f) for p, f in wholes if s <= p < s + len(passage)] for s in starts]
        covered_whole.update(p for occurrence in in_span for p, _ in occurrence)
        found_whole = [f for _, f in in_span[0]]
        if any([f for _, f in o] != found_whole for o in in_span[1:]):
            problems.append(f"whole numbers differ between copies of {passage[:60]!r}")
        if "same_lines_as" in e:
            lines = {
                normalise(x).strip()
                for x in (RESULTS / e["same_lines_as"]).read_text().splitlines()
            }
            for line in e["lines"]:
                if normalise(line).strip() not in lines:
                    problems.append(f"{e['same_lines_as']} has no line {line!r}")
            traced += [
                Traced(f, e["same_lines_as"], WRITERS.get(e["same_lines_as"]), "line", whole)
                for fs, whole in ((found, False), (found_whole, True))
                for f in fs
            ]
            continue
        figures = [(str(f), str(how)) for f, how in e.get("figures", [])]
        whole = [(str(f), str(how)) for f, how in e.get("whole", [])]
        mismatch = False
        for key, listed, there in (("figures", figures, found), ("whole", whole, found_whole)):
            if [f for f, _ in listed] != there:
                problems.append(
                    f"{key} {there} in {passage[:60]!r}... but the registry lists {[f for f, _ in listed]}"
                )
                mismatch = True
        if mismatch:
            continue
        name = e.get("file")
        for fig, how, is_whole in [(f, h, False) for f, h in figures] + [
            (f, h, True) for f, h in whole
        ]:
            if how.startswith(("external:", "unbacked:")):
                traced.append(Traced(fig, "-", None, how, is_whole))
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
            ok = value <= _number(fig) if bound else formats_to(value, fig)
            if not ok:
                problems.append(
                    f"README says {fig} ({passage[:50]!r}...), {name} gives {value!r} for {how}"
                )
            traced.append(Traced(fig, name, WRITERS.get(name), how, is_whole))
    for m in FIGURE.finditer(text):
        if m.start() not in covered:
            ctx = text[max(0, m.start() - 40) : m.end() + 20]
            problems.append(f"README figure {m.group()} is in no registry passage: ...{ctx}...")
    for pos, fig in wholes:
        if pos not in covered_whole:
            ctx = text[max(0, pos - 40) : pos + len(fig) + 20]
            problems.append(
                f"README whole-number figure {fig} is in no registry passage: ...{ctx}..."
            )
    return problems, traced


def main() -> int:
    problems, traced = check()
    for t in traced:
        print(f"{t.figure:>9}  {t.file:28s} {t.script or '-':38s} {t.how}")
    unbacked = [t for t in traced if t.how.startswith("unbacked:")]
    n_whole = sum(t.whole for t in traced)
    print(
        f"\n{len(traced)} figures ({n_whole} whole numbers); {len(unbacked)} unbacked "
        f"({sum(t.whole for t in unbacked)} whole); {len(problems)} problems"
    )
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

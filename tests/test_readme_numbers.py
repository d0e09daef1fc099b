"""Every figure in the README equals its results file (to the digits quoted),
and every results file is dated and named with the script that wrote it."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import readme_numbers as rn
from benchmarks._results import WRITERS

ROOT = Path(__file__).resolve().parents[1]


# The figures still waiting for a results file (the SciFact reranker's, until
# benchmarks/scifact_rounds.py's reranker steps run to the end; the scale
# run's PQ recall ceiling, which scale.py keeps from its next run on).
# This list may only shrink: a new unbacked figure fails the test.
UNBACKED = sorted("6.7 0.6366 0.963 0.7246 0.963 6.7 2.1 1.7 1.4 2.8 0.7 0.35".split())
# The whole-number figures (benchmarks/readme_numbers.py, WHOLE_UNIT and
# WHOLE_CELL) still waiting for a results file: the SciFact reranker's
# (scifact_rerank.json is typed in), the demo's and the suite's wall times, and
# times read from logs (polysemous PQ training, DeepSpeed's op build). This list may only shrink too.
UNBACKED_WHOLE = sorted("151 14 30,000 28 7 50 41 50 280 300".split())


def test_every_readme_figure_is_traced_to_a_results_file():
    problems, traced = rn.check()
    assert not problems, "\n".join(problems)
    unbacked = [t for t in traced if t.how.startswith("unbacked:")]
    measured = [t for t in traced if t.file not in ("-",)]
    # Shown in the test log: what still waits for a results file.
    print(f"{len(measured)} figures from results files, {len(unbacked)} unbacked:")
    for t in unbacked:
        print(f"  {t.figure}: {t.how}")
    assert len(measured) > 100
    assert len([t for t in measured if t.whole]) > 60
    assert sorted(t.figure for t in unbacked if not t.whole) == UNBACKED, (
        "the unbacked figures changed"
    )
    assert sorted(t.figure for t in unbacked if t.whole) == UNBACKED_WHOLE, (
        "the unbacked whole-number figures changed"
    )


def test_a_changed_figure_or_a_new_one_is_caught():
    readme = (ROOT / "README.md").read_text()
    # A table cell edited by hand: one digit off.
    assert "| 0.7690 (0.959) | 0.7241 (0.959) |" in readme
    edited = readme.replace(
        "| 0.7690 (0.959) | 0.7241 (0.959) |", "| 0.7690 (0.959) | 0.7251 (0.959) |"
    )
    problems, _ = rn.check(edited)
    assert any("0.7251" in p for p in problems), problems
    # A new figure that no results file backs.
    problems, _ = rn.check(readme + "\nThe new run reaches 0.8123 nDCG@10.\n")
    assert any("0.8123" in p and "no registry passage" in p for p in problems), problems


def test_a_changed_whole_number_or_a_new_one_is_caught():
    readme = (ROOT / "README.md").read_text()
    # A table cell edited by hand: one digit off.
    cell = "| 482 / 762 / 819 MiB | 539 / 863 / 998 MiB |"
    assert cell in readme
    problems, _ = rn.check(readme.replace(cell, cell.replace("863", "868")))
    assert any("868" in p for p in problems), problems
    # In prose, with thousands grouped.
    assert "said 50,880 of 100,000 passages" in readme
    problems, _ = rn.check(readme.replace("said 50,880 of", "said 50,980 of"))
    assert any("50,980" in p for p in problems), problems
    # A new measurement with a unit, and a new results-table cell.
    for new, fig in (
        ("\nThe new run took 12 min.\n", "12"),
        ("\nIt peaked at 1,234 MiB.\n", "1,234"),
        ("\n| new run | 0.6424 | 17 |\n", "17"),
    ):
        problems, _ = rn.check(readme + new)
        assert any(f"figure {fig} is in no registry passage" in p for p in problems), (
            new,
            problems,
        )


def test_whole_figures_are_measurements_by_form():
    def found(text):
        return [f for _, f in rn.whole_figures(rn.normalise(text))]

    assert (
        found("took 9 s and 1,222 s, 863 passages/s, 40% and 4× the batch")
        == "9 1,222 863 40 4".split()
    )
    assert found("| 482 / 762 / 819 MiB | 25 / 212,202 / 20 | 30 |") == (
        "482 762 819 25 212,202 20 30".split()
    )
    assert found("had 2 of 5 shards; 50,880 of 100,000 passages") == "2 5 50,880 100,000".split()
    # Not measurements by form: names, versions, decimals, settings without a unit.
    assert found("ZeRO-2 on 2 cores, 8 GPUs, PQ64x8, torch 2.13.0, 1.07×, 0.5 s, ranks 10–99") == []


def test_a_results_file_that_changes_under_the_readme_is_caught(tmp_path, monkeypatch):
    src = json.loads((rn.RESULTS / "m3_scifact.json").read_text())
    src["m3-recipe"]["metrics_by_mode"]["dense"]["nDCG@10"] = 0.7301
    fake = tmp_path / "results"
    for f in rn.RESULTS.rglob("*"):
        if f.is_file():
            dst = fake / f.relative_to(rn.RESULTS)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    (fake / "m3_scifact.json").write_text(json.dumps(src))
    monkeypatch.setattr(rn, "RESULTS", fake)
    problems, _ = rn.check()
    assert any("0.7241" in p and "0.7301" in p for p in problems), problems
    # A whole number: a peak RSS rounds to another MiB.
    scale = json.loads((rn.RESULTS / "scale.json").read_text())
    scale["sizes"][0]["stages"]["encode"]["worker_peak_rss_mib"] = 1177.2
    (fake / "scale.json").write_text(json.dumps(scale))
    problems, _ = rn.check()
    assert any("1,176" in p and "1177.2" in p for p in problems), problems


def test_formats_to_compares_at_the_quoted_digits():
    assert rn.formats_to(0.72412, "0.7241") and not rn.formats_to(0.72416, "0.7241")
    assert rn.formats_to(1.53e-6, "1.5e-6") and not rn.formats_to(1.53e-7, "1.5e-6")
    assert rn.formats_to(4.6e-8, "5e-8") and not rn.formats_to(5.6e-8, "5e-8")
    # A written sign must match; an unsigned figure is a magnitude.
    assert rn.formats_to(-0.0028, "−0.003") and not rn.formats_to(0.0028, "−0.003")
    assert rn.formats_to(0.0812, "+0.0812") and not rn.formats_to(-0.0812, "+0.0812")
    assert rn.formats_to(-4.5, "4.5")  # "by 4.5 points": a magnitude
    # Whole numbers: rounded to units, thousands grouped as the figure groups them.
    assert rn.formats_to(1221.57, "1,222") and not rn.formats_to(1221.57, "1,221")
    assert rn.formats_to(8.86, "9") and not rn.formats_to(9.6, "9")
    assert rn.formats_to(100 * 0.4, "40") and rn.formats_to(1000, "1000")
    assert rn.formats_to(699.5, "700") and not rn.formats_to(12220, "1,222")


def test_every_results_file_is_dated_and_names_its_script():
    files = [p for p in rn.RESULTS.rglob("*.json")]
    assert files
    for p in files:
        rel = str(p.relative_to(rn.RESULTS))
        assert rel in WRITERS, f"{rel}: no script is known to write it (benchmarks/_results.py)"
        written = json.loads(p.read_text()).get("written")
        assert written and written.get("date"), f"{rel}: not dated"
        assert written.get("script") == WRITERS[rel], (rel, written)

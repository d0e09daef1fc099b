"""The console: progress lines off a terminal, one summary per stage, raysys
warnings once, and everything else (stray prints, library logs, C-level
writes) in the run's log file, not on the terminal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

from raysys.console import Progress, duration


def test_progress_lines_off_a_terminal(capsys):
    bar = Progress("encode", 10, "passages", interval=0.0)
    for _ in range(3):
        bar.update(2, shards="1/2")
    bar.close("encode: 6 passages")
    lines = capsys.readouterr().err.splitlines()
    assert all(x.startswith("encode: ") and "/10 passages" in x for x in lines[:3])
    assert [line.split()[1] for line in lines[:3]] == ["2/10", "4/10", "6/10"]
    assert "shards 1/2" in lines[0]
    assert lines[-1] == "encode: 6 passages"


def test_progress_is_quiet_between_intervals(capsys):
    bar = Progress("search", 1000, "queries", interval=3600)
    for _ in range(100):
        bar.update(10)
    bar.close("search: done")
    assert capsys.readouterr().err.splitlines() == ["search: done"]


def test_duration():
    assert duration(4.21) == "4.2s"
    assert duration(185) == "3m05s"
    assert duration(3720) == "1h02m"


SCRIPT = """
import logging, os, sys, warnings
from raysys.console import session, say, result
with session(sys.argv[1], verbose=False):
    say("stage: done")
    result('{"ok": 1}')
    print("stray print from a library")
    os.write(2, b"C-level write to fd 2\\n")
    logging.getLogger("ray.data").warning("a library warning")
    warnings.warn("a python warning")
    log = logging.getLogger("raysys.index")
    log.warning("codes too coarse")
    log.warning("codes too coarse")
    log.info("an info line")
print("after the session: terminal again")
"""


def test_session_sends_everything_else_to_the_log(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["stage: done", "warning: codes too coarse"]
    assert proc.stdout.splitlines() == ['{"ok": 1}', "after the session: terminal again"]
    text = (tmp_path / "raysys.log").read_text()
    for line in (
        "stray print from a library",
        "C-level write to fd 2",
        "a library warning",
        "a python warning",
        "an info line",
        "stage: done",
    ):
        assert line in text, line


def test_session_verbose_keeps_the_terminal(tmp_path, capfd):
    from raysys.console import session

    with session(tmp_path, verbose=True):
        logging.getLogger("some.library").warning("visible library warning")
        print("visible print")
    out, err = capfd.readouterr()
    assert "visible print" in out and "visible library warning" in err
    assert "visible library warning" in (tmp_path / "raysys.log").read_text()

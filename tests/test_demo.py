"""The newcomer's first run, shortened: `scripts/demo.sh` in a terminal (a
pty) on a small docstring corpus and a few training steps. Its console must
stay short (at most 60 lines as a terminal shows them, none repeated) and
still show a bar per stage; its report must compare base and fine-tuned on
an IVF index with at least 4 nprobe points; the loss curve and TensorBoard
events must hold every step."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STEPS = 6


def _run_in_terminal(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``cmd`` with a pty as its stdout and stderr; (returncode, raw output)."""
    master, slave = pty.openpty()
    # A terminal 120 columns wide (a new pty is 0 x 0, where bars draw nothing).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=ROOT
    )
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    while True:
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(
                "demo did not finish in time:\n" + b"".join(chunks).decode()[-3000:]
            )
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data and proc.poll() is not None:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(), b"".join(chunks).decode(errors="replace")


def screen_lines(raw: str) -> list[str]:
    """The lines a terminal keeps: each line's text after its last carriage
    return (progress bars redraw in place), without colour codes."""
    lines = []
    for line in ANSI.sub("", raw).replace("\r\n", "\n").split("\n"):
        shown = line.split("\r")[-1].rstrip()
        if shown:
            lines.append(shown)
    return lines


def test_short_demo_console_and_report(tmp_path):
    out = tmp_path / "demo"
    env = {
        **os.environ,
        "OUT": str(out),
        "DEMO_SOURCES": "small",
        "DEMO_PAIRS": "1200",
        "TERM": "xterm",
        "COLUMNS": "120",
    }
    rc, raw = _run_in_terminal(
        [
            "bash",
            "scripts/demo.sh",
            f"train.max_steps={STEPS}",
            f"train.checkpoint.storage_path={tmp_path / 'ray'}",
        ],
        env,
        timeout=900,
    )
    lines = screen_lines(raw)
    assert rc == 0, "\n".join(lines[-40:])
    # 1. A clean console: short, nothing printed twice, a bar per stage.
    assert len(lines) <= 60, "\n".join(lines)
    repeated = {x for x in lines if lines.count(x) > 1}
    assert not repeated, repeated
    for frag in (
        "[base] encode: 1,200 passages",
        "[base] index: IVF",
        "[base] search: ",
        f"train (retrieve): {STEPS}/{STEPS} steps",
        "encode: 1,200",
        "report: ",
    ):
        assert any(frag in x for x in lines), (frag, lines)
    assert not any("Traceback" in x or "WARNING" in x for x in lines), lines
    # The bars were drawn (tqdm frames, redrawn in place, then cleared).
    frames = [f for f in re.split(r"[\r\n]", ANSI.sub("", raw)) if "%|" in f]
    for unit in ("passages", "steps", "queries", "shards"):
        assert any(f" {unit}/s" in f or f"s/ {unit}" in f for f in frames), (unit, frames[-5:])
    assert any("loss=" in f and "tok/s=" in f for f in frames), frames[-5:]
    assert "raysys.log" in lines[0]
    # 2. The report compares base and fine-tuned on an IVF index.
    report = (out / "report.md").read_text()
    assert "| metric | base | fine-tuned |" in report
    sweep = re.findall(r"^\| (\d+) \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$", report, re.M)
    assert len(sweep) >= 4, report
    assert "![training loss](train/loss.png)" in report
    assert (out / "train" / "loss.png").stat().st_size > 1000
    assert (out / "nprobe.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "train" / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, STEPS + 1))
    # Ray's and the libraries' output went to the log file instead.
    log = (out / "raysys.log").read_text()
    assert "[raysys] step" in log and "Started a local Ray instance" in log

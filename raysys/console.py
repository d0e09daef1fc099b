"""What a person sees: one progress bar per stage, one summary line at the end
of each, and nothing else. Everything else (Ray's and the libraries' logs,
worker output, warnings) goes to the run's log file, whose path is printed.

- :func:`session` wraps a CLI verb. Unless ``verbose``, it points the
  process's stdout and stderr file descriptors at ``raysys.log`` in the run
  folder (so Ray's forwarded worker output, C++ library messages and Python
  warnings land there too) and keeps the terminal for :data:`console`.
- :class:`Progress` is a stage's bar: tqdm on a terminal; elsewhere (a log
  file, ``ray job submit``) a plain line at most every ``RAYSYS_PROGRESS_S``
  seconds (30), as tqdm's and Ray's own non-interactive output does.
- :func:`say` prints a line on the console (and logs it); raysys warnings
  show once each as ``warning: ...``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("raysys")

LOG_FILE = "raysys.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Console:
    """The terminal: stderr for bars and summaries, stdout for results."""

    def __init__(self) -> None:
        self._err: IO[str] | None = None
        self._out: IO[str] | None = None
        self.log_path: Path | None = None
        self.verbose = False
        self.prefix = ""
        self.bars = 0  # live tqdm bars

    @property
    def err(self) -> IO[str]:
        return self._err or sys.stderr

    @property
    def out(self) -> IO[str]:
        return self._out or sys.stdout

    def is_tty(self) -> bool:
        try:
            return self.err.isatty()
        except (AttributeError, ValueError):
            return False


console = _Console()


@contextmanager
def scope(label: str) -> Iterator[None]:
    """Prefix this block's bars and summaries with ``[label]`` (e.g. ``base``)."""
    saved = console.prefix
    console.prefix = f"[{label}] "
    try:
        yield
    finally:
        console.prefix = saved


def _emit(line: str) -> None:
    """Print a line above any live bar (tqdm clears and redraws it)."""
    if console.bars:
        from tqdm import tqdm

        tqdm.write(line, file=console.err)
    else:
        print(line, file=console.err, flush=True)


def say(line: str) -> None:
    """One line on the console (stderr), also written to the log file."""
    line = console.prefix + line
    _emit(line)
    if console.log_path is not None:
        logging.getLogger("raysys.console").info(line)


def result(text: str) -> None:
    """A verb's result (JSON, a path) on stdout, for scripts to read."""
    print(text, file=console.out, flush=True)


def duration(seconds: float) -> str:
    """``42.1s``, ``3m05s`` or ``1h02m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class Progress:
    """A stage's progress: ``update(n, **postfix)``, then ``close(summary)``.

    On a terminal this is a tqdm bar that is cleared when the stage ends and
    replaced by its summary line; elsewhere, a line every ``interval`` s.
    """

    def __init__(
        self, desc: str, total: int | None, unit: str, *, interval: float | None = None
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.n = 0
        self.t0 = time.perf_counter()
        self._last_line = self.t0
        self.interval = (
            float(os.environ.get("RAYSYS_PROGRESS_S", "30")) if interval is None else interval
        )
        self._postfix: dict[str, Any] = {}
        self._bar: Any = None
        if console.is_tty():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                desc=console.prefix + desc,
                unit=f" {unit}",
                file=console.err,
                leave=False,
                dynamic_ncols=True,
                mininterval=0.2,
            )
            console.bars += 1

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        self._postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self._postfix, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.interval:
            self._last_line = now
            say(self._line())

    def _line(self) -> str:
        of = f"/{self.total}" if self.total else ""
        rate = self.n / max(self.elapsed, 1e-9)
        speed = f"{rate:.1f}/s" if rate >= 1 or not self.n else f"{1 / rate:.1f}s each"
        extra = "".join(f", {k} {_fmt(v)}" for k, v in self._postfix.items())
        return f"{self.desc}: {self.n}{of} {self.unit} ({speed}{extra}), {duration(self.elapsed)}"

    def close(self, summary: str | None = None) -> None:
        """End the bar; print ``summary`` (one line) in its place."""
        self._end()
        if summary:
            say(summary)

    def _end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            console.bars -= 1

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._end()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class _ConsoleFilter(logging.Filter):
    """raysys's own warnings and errors, each message once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("raysys") or record.name == "raysys.console":
            return False
        if record.levelno < logging.WARNING:
            return False
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


class _ConsoleHandler(logging.Handler):
    """raysys warnings as ``warning: ...`` lines, above any live bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _emit(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:
            self.handleError(record)


@contextmanager
def session(log_dir: str | Path | None, verbose: bool = False) -> Iterator[Path | None]:
    """Console and logging for one CLI run; yields the log file's path (or None).

    Without ``verbose`` and with a ``log_dir``, file descriptors 1 and 2 point
    at ``log_dir/raysys.log`` until the run ends; the console keeps the
    terminal. With ``verbose``, everything shows on the terminal at DEBUG
    level and the log file gets a copy of the Python logs.
    """
    root = logging.getLogger()
    saved_level = root.level
    handlers: list[logging.Handler] = []
    log_path = None
    fds: tuple[int, int] | None = None
    if log_dir is not None:
        log_path = Path(log_dir) / LOG_FILE
        log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_path)
        fh.setFormatter(logging.Formatter(FORMAT))
        handlers.append(fh)
    if verbose:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter(FORMAT))
        handlers.append(sh)
    else:
        ch = _ConsoleHandler()
        ch.addFilter(_ConsoleFilter())
        handlers.append(ch)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    if log_path is not None and not verbose:
        sys.stdout.flush()
        sys.stderr.flush()
        fds = (os.dup(1), os.dup(2))
        target = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(target, 1)
        os.dup2(target, 2)
        os.close(target)
        console._out = os.fdopen(os.dup(fds[0]), "w", buffering=1)
        console._err = os.fdopen(os.dup(fds[1]), "w", buffering=1)
    for h in handlers:
        root.addHandler(h)
    console.log_path, console.verbose = log_path, verbose
    try:
        yield log_path
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(saved_level)
        logging.captureWarnings(False)
        console.log_path, console.verbose = None, False
        if fds is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            for s in (console._out, console._err):
                if s is not None:
                    s.close()
            console._out = console._err = None
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            os.close(fds[0])
            os.close(fds[1])

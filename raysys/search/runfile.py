"""TREC run files: ``qid Q0 docid rank score tag``."""

from __future__ import annotations

from pathlib import Path

from raysys.errors import UserError
from raysys.storage import Location, resolve

Run = dict[str, dict[str, float]]


def write_run(run: Run, path: str | Path | Location, tag: str = "raysys") -> Location:
    """Write a run (a local path or a storage URI), each query's hits by
    descending score (ties by doc id)."""
    lines = []
    for qid in sorted(run):
        hits = sorted(run[qid].items(), key=lambda kv: (-kv[1], kv[0]))
        for rank, (did, score) in enumerate(hits, start=1):
            lines.append(f"{qid} Q0 {did} {rank} {score:.6f} {tag}\n")
    loc = resolve(path)
    loc.write_text("".join(lines))
    return loc


class RunFileError(UserError):
    """A run file is missing or malformed; the message names file and line."""


def read_run(path: str | Path) -> Run:
    """Read a TREC run; a malformed line raises :class:`RunFileError` naming it."""
    import io

    loc = resolve(path)
    path = loc.uri
    if not loc.is_file():
        raise RunFileError(f"no such run file: {path}")
    run: Run = {}
    with io.BufferedReader(loc.fs.open_input_stream(loc.path)) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                parts = raw.decode("utf-8").split()
            except UnicodeDecodeError:
                raise RunFileError(f"{path}:{lineno}: not valid UTF-8") from None
            if not parts:
                continue
            if len(parts) != 6:
                raise RunFileError(
                    f"{path}:{lineno}: a run line has 6 fields "
                    f"(qid Q0 docid rank score tag), got {len(parts)}"
                )
            qid, _, did, _, score, _ = parts
            try:
                run.setdefault(qid, {})[did] = float(score)
            except ValueError:
                raise RunFileError(f"{path}:{lineno}: score {score!r} is not a number") from None
    return run

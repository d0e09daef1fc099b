"""TREC run files: ``qid Q0 docid rank score tag``."""

from __future__ import annotations

from pathlib import Path

Run = dict[str, dict[str, float]]


def write_run(run: Run, path: str | Path, tag: str = "raysys") -> Path:
    """Write a run, each query's hits by descending score (ties by doc id)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for qid in sorted(run):
            hits = sorted(run[qid].items(), key=lambda kv: (-kv[1], kv[0]))
            for rank, (did, score) in enumerate(hits, start=1):
                f.write(f"{qid} Q0 {did} {rank} {score:.6f} {tag}\n")
    return path


def read_run(path: str | Path) -> Run:
    run: Run = {}
    with Path(path).open() as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise ValueError(f"{path}:{lineno}: a run line has 6 fields, got {len(parts)}")
            qid, _, did, _, score, _ = parts
            run.setdefault(qid, {})[did] = float(score)
    return run

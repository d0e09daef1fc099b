"""A demo BEIR dataset built at run time from the Python standard library's docstrings.

Each documented function or class gives a weak title→body pair in the E5
manner: the docstring's summary line is the query, the rest of the docstring
(prefixed with the qualified name as title) is the passage. Nothing is
downloaded; the same Python gives the same dataset.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import warnings
from pathlib import Path

MODULES = (
    "argparse collections csv datetime decimal difflib email.message fractions functools "
    "gzip heapq hashlib http.client inspect io itertools json logging os pathlib pickle "
    "random re shutil socket sqlite3 statistics string subprocess tarfile tempfile textwrap "
    "threading time unittest urllib.parse uuid zipfile"
).split()


def _pairs() -> list[tuple[str, str, str]]:
    out, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            members = []
            for attr, obj in sorted(vars(mod).items()):
                if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                    continue
                if getattr(obj, "__module__", None) != mod.__name__:
                    continue
                members.append((attr, obj))
                if inspect.isclass(obj):
                    members += [
                        (f"{attr}.{m}", f)
                        for m, f in sorted(vars(obj).items())
                        if not m.startswith("_") and inspect.isfunction(f)
                    ]
            for attr, obj in members:
                doc = obj.__doc__ and inspect.cleandoc(obj.__doc__) or ""
                parts = doc.strip().split("\n\n", 1)
                if len(parts) < 2:
                    continue
                summary, body = parts[0].replace("\n", " ").strip(), parts[1].strip()
                if len(summary) < 15 or len(body) < 40 or summary in seen:
                    continue
                seen.add(summary)
                out.append((f"{name}.{attr}", summary, body))
    return out


def build_demo_beir(root: str | Path, test_fraction: float = 0.3, seed: int = 0) -> Path:
    """Write corpus.jsonl, queries.jsonl and qrels/{train,test}.tsv under ``root``."""
    root = Path(root)
    if (root / "qrels" / "test.tsv").is_file():
        return root
    pairs = _pairs()
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    n_test = int(len(order) * test_fraction)
    split = {i: ("test" if k < n_test else "train") for k, i in enumerate(order)}
    with (root / "corpus.jsonl").open("w") as c, (root / "queries.jsonl").open("w") as q:
        for i, (title, summary, body) in enumerate(pairs):
            c.write(json.dumps({"_id": f"d{i}", "title": title, "text": body}) + "\n")
            q.write(json.dumps({"_id": f"q{i}", "text": summary}) + "\n")
    for name in ("train", "test"):
        with (root / "qrels" / f"{name}.tsv").open("w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for i in range(len(pairs)):
                if split[i] == name:
                    f.write(f"q{i}\td{i}\t1\n")
    return root

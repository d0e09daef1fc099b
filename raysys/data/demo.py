"""An offline demo BEIR dataset: docstrings of the Python install.

Each documented function or class gives a weak title->body pair in the E5
manner: the docstring's summary line is the query, the rest of the docstring
(with the qualified name as title) is its one relevant passage. Source files
are parsed with :mod:`ast`, never imported, so any installed package can be
read safely and quickly. Nothing is downloaded; the same install gives the
same dataset.

Sources: ``small`` reads the standard library (about 2k pairs: tests);
``full`` adds the packages in :data:`PACKAGES` that are installed (about 11k
pairs with raysys's own dependencies). ``max_pairs`` keeps a seeded sample:
the demo's 4,000 passages are enough for an IVF-PQ index whose quality
visibly depends on nprobe, and few enough to encode twice in a few minutes
on 2 CPU cores.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Read in this order; a summary line already seen is skipped.
PACKAGES = ("numpy", "pandas", "matplotlib", "pyarrow", "ray")
SKIP_PARTS = {"test", "tests", "testing", "idlelib", "lib2to3", "site-packages", "_vendor"}
TEST_QUERIES = 500


def _files(size: str) -> list[tuple[str, Path, Path]]:
    """(package, root, file) for every source file to read, in a fixed order."""
    paths = sysconfig.get_paths()
    std = Path(paths["stdlib"])
    out = [
        ("stdlib", std, f)
        for f in sorted(std.rglob("*.py"))
        if not SKIP_PARTS & set(f.relative_to(std).parts[:-1])
    ]
    if size == "full":
        site = Path(paths["purelib"])
        for pkg in PACKAGES:
            root = site / pkg
            if root.is_dir():
                out += [
                    (pkg, site, f)
                    for f in sorted(root.rglob("*.py"))
                    if not SKIP_PARTS & set(f.relative_to(root).parts[:-1])
                ]
    return out


def _qualname(root: Path, f: Path, names: list[str]) -> str:
    mod = ".".join(f.relative_to(root).with_suffix("").parts)
    mod = mod.removesuffix(".__init__")
    return ".".join([mod, *names])


def _file_pairs(item: tuple[str, Path, Path]) -> list[tuple[str, str, str]]:
    """(title, summary, body) of each documented def/class in one file."""
    _, root, f = item
    try:
        tree = ast.parse(f.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return []
    pairs: list[tuple[str, str, str]] = []

    def visit(node: ast.AST, names: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_"):
                    continue
                doc = ast.get_docstring(child) or ""
                parts = doc.strip().split("\n\n", 1)
                if len(parts) == 2:
                    summary, body = " ".join(parts[0].split()), parts[1].strip()
                    if len(summary) >= 15 and len(body) >= 40:
                        pairs.append((_qualname(root, f, [*names, child.name]), summary, body))
                if isinstance(child, ast.ClassDef):
                    visit(child, [*names, child.name])

    visit(tree, [])
    return pairs


def docstring_pairs(size: str = "full", workers: int = 2) -> list[tuple[str, str, str]]:
    """Deduplicated (title, summary, body) pairs, in a fixed order."""
    files = _files(size)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        per_file = list(pool.map(_file_pairs, files, chunksize=64))
    out, seen, bodies = [], set(), set()
    for pairs in per_file:
        for title, summary, body in pairs:
            if summary in seen or body in bodies:
                continue
            seen.add(summary)
            bodies.add(body)
            out.append((title, summary, body))
    return out


def build_demo_beir(
    root: str | Path, size: str = "full", max_pairs: int = 4000, seed: int = 0
) -> Path:
    """Write corpus.jsonl, queries.jsonl and qrels/{train,test}.tsv under ``root``.

    Up to ``max_pairs`` pairs (a seeded sample; 0: all) are kept. Every pair's
    passage is in the corpus; :data:`TEST_QUERIES` of the queries (a seeded
    sample, at most a quarter) are the test split, the rest the train split.
    """
    root = Path(root)
    done = root / "qrels" / "test.tsv"
    if done.is_file():
        return root
    pairs = docstring_pairs(size)
    rng = random.Random(seed)
    if max_pairs and len(pairs) > max_pairs:
        pairs = [pairs[i] for i in sorted(rng.sample(range(len(pairs)), max_pairs))]
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    n_test = min(TEST_QUERIES, len(pairs) // 4)
    test = set(order[:n_test])
    with (root / "corpus.jsonl").open("w") as c, (root / "queries.jsonl").open("w") as q:
        for i, (title, summary, body) in enumerate(pairs):
            c.write(json.dumps({"_id": f"d{i}", "title": title, "text": body}) + "\n")
            q.write(json.dumps({"_id": f"q{i}", "text": summary}) + "\n")
    for name in ("train", "test"):
        tmp = root / "qrels" / f"{name}.tsv.tmp"
        with tmp.open("w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for i in range(len(pairs)):
                if (i in test) == (name == "test"):
                    f.write(f"q{i}\td{i}\t1\n")
        tmp.replace(root / "qrels" / f"{name}.tsv")  # test.tsv last: marks the folder complete
    return root

"""Layering: indexing and search do not depend on training, and the stages are
called, not re-implemented (the search call exists once)."""

from __future__ import annotations

import ast
from pathlib import Path

import raysys

ROOT = Path(raysys.__file__).parent


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
    return mods


def _calls(path: Path, name: str) -> int:
    n = 0
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            n += called == name
    return n


def test_index_and_search_import_nothing_from_train():
    for pkg in ("index", "search", "representations"):
        for f in (ROOT / pkg).rglob("*.py"):
            bad = {m for m in _imports(f) if m.startswith("raysys.train")}
            assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_the_search_call_is_written_once():
    files = list(ROOT.rglob("*.py"))
    searchers = {f.relative_to(ROOT).as_posix(): _calls(f, "Searcher") for f in files}
    assert {f: n for f, n in searchers.items() if n} == {"stages.py": 1}
    encodes = {f.relative_to(ROOT).as_posix(): _calls(f, "encode_corpus") for f in files}
    assert {f: n for f, n in encodes.items() if n} == {"stages.py": 1}
    builds = {f.relative_to(ROOT).as_posix(): _calls(f, "build_index") for f in files}
    # stages.py calls the representation's build_index, which calls FAISS's build.
    assert {f: n for f, n in builds.items() if n} == {
        "stages.py": 1,
        "representations/dense.py": 1,
    }


def test_models_import_only_public_names():
    for f in (ROOT / "models").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("raysys"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{f.name} imports private {private} from {node.module}"

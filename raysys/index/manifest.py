"""Manifests for embedding folders and indexes (JSON, written atomically)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from raysys.errors import UserError

MANIFEST = "manifest.json"


class ManifestMissing(UserError, FileNotFoundError):
    """The folder holds no manifest: it is not an embeddings or index folder."""


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader (or a crash) never sees half a file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestMissing(
            f"{directory}: no {MANIFEST} here; expected the output folder of "
            "`raysys encode` (its embeddings/) or `raysys index`"
        )
    return json.loads(path.read_text())


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(Path(directory) / MANIFEST, manifest)

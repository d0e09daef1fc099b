"""Manifests for embedding folders and indexes (JSON, written atomically),
in a local folder or under any storage URI (:mod:`raysys.storage`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raysys.errors import UserError
from raysys.storage import Location, resolve

MANIFEST = "manifest.json"


class ManifestMissing(UserError, FileNotFoundError):
    """The folder holds no manifest: it is not an embeddings or index folder."""


def read_manifest(directory: str | Path | Location) -> dict[str, Any]:
    loc = resolve(directory).join(MANIFEST)
    if not loc.is_file():
        raise ManifestMissing(
            f"{directory}: no {MANIFEST} here; expected the output folder of "
            "`raysys encode` (its embeddings/) or `raysys index`"
        )
    return loc.read_json()


def write_manifest(directory: str | Path | Location, manifest: dict[str, Any]) -> None:
    """Readers (and a crash) see the old manifest or the new one, never a part."""
    resolve(directory).join(MANIFEST).write_json(manifest)

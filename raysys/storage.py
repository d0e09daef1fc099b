"""Where files live: local paths or any pyarrow filesystem URI (``s3://``,
``gs://``, ``file://``), behind one small API.

Every stage that reads or writes run files goes through :func:`resolve`, so
``--out s3://bucket/prefix`` works on a cluster whose nodes share no disk.
S3 settings come from the usual AWS environment variables. pyarrow's
``S3FileSystem`` ignores ``AWS_ENDPOINT_URL`` (seen with pyarrow 26), so it is
read here and passed as ``endpoint_override``: an S3-compatible server
(MinIO, moto) works with ``AWS_ENDPOINT_URL=http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

CACHE_ROOT = Path(os.environ.get("RAYSYS_CACHE", Path.home() / ".cache" / "raysys")) / "remote"


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` (not a Windows drive, not a plain path)."""
    return "://" in str(location)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the AWS environment variables."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, object] = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)  # credentials: AWS_ACCESS_KEY_ID/SECRET, ~/.aws


@dataclass(frozen=True)
class Location:
    """A filesystem and a path inside it; ``uri`` is how a user wrote it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        sep = "/" if self.is_remote else os.sep
        path = (posixpath if sep == "/" else os.path).join(self.path, *parts)
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri)

    @property
    def is_remote(self) -> bool:
        return not isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file so that readers see the old or the new one,
        never a part: a local file is written aside and renamed; an object
        store's PUT is atomic."""

        def write(path: str) -> None:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

        self._write_with(write)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def listdir(self) -> list[str]:
        """Names directly under this folder (empty if it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(posixpath.basename(i.path) for i in infos)

    def delete(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    @property
    def portable(self) -> str:
        """How another process (or node) names this place: the URI of a
        remote location, the absolute path of a local one."""
        return self.uri if self.is_remote else self.path

    @property
    def local_path(self) -> Path | None:
        """The local path, or None for a remote location."""
        return None if self.is_remote else Path(self.path)

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def open_input(self) -> pa.NativeFile:
        """A random-access reader (what Parquet needs)."""
        return self.fs.open_input_file(self.path)

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def write_json(self, obj: Any) -> None:
        """Atomically (see :meth:`write_bytes`)."""
        self.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def read_parquet(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path, columns=columns, filesystem=self.fs)

    def parquet_rows(self) -> int:
        """Row count from the footer (no data read)."""
        with self.open_input() as f:
            return pq.ParquetFile(f).metadata.num_rows

    def write_parquet(self, table: pa.Table) -> None:
        """Atomically: aside and renamed locally; one PUT (or a multipart
        upload completed at close) on an object store."""
        self._write_with(lambda path: pq.write_table(table, path, filesystem=self.fs))

    def _write_with(self, write: Any) -> None:
        """Call ``write(path)`` so that the file appears whole: locally at a
        side path, then renamed; on an object store straight at its key."""
        parent = posixpath.dirname(self.path) if self.is_remote else os.path.dirname(self.path)
        if parent:
            self.fs.create_dir(parent, recursive=True)
        if self.is_remote:
            write(self.path)
            return
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            write(tmp)
            self.fs.move(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def upload(self, local: str | Path) -> None:
        """Copy a local file, or a folder's tree, to this location."""
        local = Path(local)
        if local.is_dir():
            for f in sorted(local.rglob("*")):
                if f.is_file():
                    self.join(*f.relative_to(local).parts).upload(f)
            return
        if not self.is_remote and Path(self.path).resolve() == local.resolve():
            return
        self._write_with(
            lambda path: pafs.copy_files(
                str(local),
                path,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )
        )

    def files(self) -> list[pafs.FileInfo]:
        """Every file under this folder, recursively."""
        sel = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        return [i for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]

    def __str__(self) -> str:
        return self.uri


def parent(location: str | Path) -> str:
    """The folder holding a file (a path or a URI), as written."""
    text = str(location).rstrip("/")
    if is_uri(text):
        return text.rsplit("/", 1)[0]
    return str(Path(text).parent)


def local_copy(location: str | Path | Location) -> Path:
    """A local path holding this file or folder: the path itself when it is
    local, else a copy under the raysys cache (one per URI, fetched again only
    when a file's size or modification time changed)."""
    from filelock import FileLock

    loc = resolve(location)
    if not loc.is_remote:
        return Path(loc.path)
    dest = CACHE_ROOT / hashlib.sha1(loc.uri.rstrip("/").encode()).hexdigest()[:16]
    single = loc.is_file()
    infos = [loc.info()] if single else loc.files()
    if not infos:
        raise FileNotFoundError(f"{loc.uri}: no such file or folder")
    stamp = {
        (loc.name if single else posixpath.relpath(i.path, loc.path)): [i.size, str(i.mtime)]
        for i in infos
    }
    target = dest / loc.name if single else dest
    marker = dest / ".raysys-stamp.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Several processes of a node (actors starting together) share one copy.
    with FileLock(str(dest) + ".lock"):
        if marker.is_file() and json.loads(marker.read_text()) == stamp:
            return target
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for rel in stamp:
            src = loc.path if single else posixpath.join(loc.path, rel)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(
                src,
                str(dest / rel),
                source_filesystem=loc.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        marker.write_text(json.dumps(stamp))
    return target


def resolve(location: str | Path | Location) -> Location:
    """A :class:`Location` for a local path, ``file://``, ``s3://`` or any
    URI pyarrow knows."""
    if isinstance(location, Location):
        return location
    text = str(location)
    if not is_uri(text):
        return Location(pafs.LocalFileSystem(), str(Path(text).resolve()), text)
    scheme = urlparse(text).scheme
    if scheme == "s3":
        rest = text[len("s3://") :]
        return Location(s3_filesystem(), rest.rstrip("/"), text)
    if scheme == "file":
        return Location(pafs.LocalFileSystem(), urlparse(text).path, text)
    fs, path = pafs.FileSystem.from_uri(text)
    return Location(fs, path, text)

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

import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


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
        parent = posixpath.dirname(self.path) if self.is_remote else os.path.dirname(self.path)
        if parent:
            self.fs.create_dir(parent, recursive=True)
        if self.is_remote:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.path)

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

    def __str__(self) -> str:
        return self.uri


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

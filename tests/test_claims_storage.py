"""README "Storage": ``gs://bucket/prefix`` is a supported location (issue
#33, item 7). No GCS server runs here, so this checks what needs none: the URI
becomes pyarrow's GCS filesystem with the bucket-relative path, and paths
below it, their URIs (what workers on other nodes are handed) and parents are
formed as for ``s3://``. Reads and writes through it are not tested."""

from __future__ import annotations

import pyarrow.fs as pafs

from raysys.storage import parent, resolve


def test_a_gs_uri_is_pyarrows_gcs_filesystem() -> None:
    loc = resolve("gs://my-bucket/runs/x")
    assert isinstance(loc.fs, pafs.GcsFileSystem) and loc.is_remote
    assert loc.path == "my-bucket/runs/x" and loc.name == "x"
    assert loc.local_path is None and loc.portable == "gs://my-bucket/runs/x"
    shard = loc.join("encode", "part-00000.parquet")
    assert shard.path == "my-bucket/runs/x/encode/part-00000.parquet"
    assert shard.portable == "gs://my-bucket/runs/x/encode/part-00000.parquet"
    assert isinstance(resolve(shard.portable).fs, pafs.GcsFileSystem)
    assert resolve(shard.portable).path == shard.path
    assert parent(shard.portable) == "gs://my-bucket/runs/x/encode"

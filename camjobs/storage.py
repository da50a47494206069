"""Where files live: local paths or any URI pyarrow.fs understands (s3://, gs://, ...)."""

from __future__ import annotations

import pyarrow.fs as pafs


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path within it, for a local path or a URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    return pafs.FileSystem.from_uri(uri)

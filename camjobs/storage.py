"""Where files live: local paths or any URI pyarrow.fs understands (s3://, gs://, ...).

Object-store URIs are taken as the AWS CLI takes them: s3://BUCKET/KEY with the key as written
(spaces, non-ASCII letters and "%" are part of the name, never escapes), and an optional query of
pyarrow's options (?region=...). pyarrow does not read AWS_ENDPOINT_URL (nor AWS_ENDPOINT_URL_S3),
the variables with which the AWS SDKs and CLI reach S3-compatible stores (MinIO, Ceph, ...), so an
s3:// URI without an endpoint_override takes its endpoint from them here. One filesystem per bucket
and options is made per process and reused: a run reads every image through it, and a new S3 client
per image would look up the bucket's region and open new connections each time.
"""

from __future__ import annotations

import functools
import os
import urllib.parse

import pyarrow.fs as pafs

BUCKET_SCHEMES = ("s3", "gs", "gcs")  # URIs whose first part names a bucket, the rest a key
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the AWS SDKs' order: the S3 one first


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path within it, for a local path or a URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    scheme, rest = uri.split("://", 1)
    if scheme.lower() not in BUCKET_SCHEMES:
        return pafs.FileSystem.from_uri(uri)
    location, _, query = rest.partition("?")
    bucket, _, key = location.partition("/")
    fs, root = _bucket_filesystem(scheme.lower(), bucket, _with_endpoint(scheme.lower(), query))
    key = key.strip("/")
    return fs, f"{root}/{key}" if key else root


def s3_endpoint() -> str | None:
    """The S3 endpoint that the environment names (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL), or None."""
    return next((os.environ[name] for name in ENDPOINT_VARIABLES if os.environ.get(name)), None)


def _with_endpoint(scheme: str, query: str) -> str:
    """The URI's query, with the environment's S3 endpoint where the query names none."""
    endpoint = s3_endpoint() if scheme == "s3" else None
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if endpoint is None or any(name == "endpoint_override" for name, _ in pairs):
        return query
    parts = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    pairs += [("endpoint_override", parts.netloc), ("scheme", parts.scheme)]
    return urllib.parse.urlencode(pairs)


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, bucket: str, query: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a bucket (with the options of the query) and the bucket's path in it."""
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}/" + (f"?{query}" if query else ""))

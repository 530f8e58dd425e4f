"""One way to reach storage: fsspec for local paths and ``s3://`` alike.

The S3 endpoint follows the AWS SDK conventions (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``),
so the same code talks to real S3, MinIO or a moto server with configuration only.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec

S3_SCHEMES = ("s3://", "s3a://")


def is_remote(url: str) -> bool:
    """True for ``s3://`` (and other fsspec protocol) URLs, False for local paths."""
    return "://" in str(url) and not str(url).startswith("file://")


def s3_endpoint_url() -> str | None:
    """The S3 endpoint from the environment, as the AWS SDKs read it."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options(url: str) -> dict[str, Any]:
    """fsspec storage options for ``url`` (endpoint for S3, nothing for local)."""
    if str(url).startswith(S3_SCHEMES):
        opts: dict[str, Any] = {}
        endpoint = s3_endpoint_url()
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            opts.setdefault("client_kwargs", {})["region_name"] = region
        return opts
    return {}


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it (protocol stripped for S3)."""
    url = str(url)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if is_remote(url):
        protocol = url.split("://", 1)[0]
        if protocol == "s3a":
            protocol = "s3"
        fs = fsspec.filesystem(protocol, **storage_options(url))
        return fs, fs._strip_protocol(url)
    return fsspec.filesystem("file"), os.path.abspath(url)


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for URLs and ``os.path.join`` for local paths."""
    if is_remote(base):
        out = base.rstrip("/")
        for p in parts:
            out = out + "/" + p.strip("/")
        return out
    return os.path.join(base, *parts)

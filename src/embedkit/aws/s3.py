"""S3 staging for jobs: upload local files and folders, list and download prefixes.

Downloads follow SageMaker's ``S3Prefix`` semantics: the objects under ``s3://bucket/prefix/`` land
under the local folder with the prefix removed (``s3://b/data/a/x.parquet`` -> ``LOCAL/a/x.parquet``),
and a prefix that names one object lands as ``LOCAL/<its name>``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from embedkit.aws.session import client
from embedkit.errors import ConfigError, StorageError

log = logging.getLogger(__name__)


def is_s3(url: str) -> bool:
    return str(url).startswith(("s3://", "s3a://"))


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``("bucket", "key")``.

    >>> split_s3("s3://b/a/c.txt")
    ('b', 'a/c.txt')
    """
    if not is_s3(url):
        raise ConfigError(f"{url!r} is not an s3:// URL")
    rest = str(url).split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{url!r} has no bucket name")
    return bucket, key


def s3_join(base: str, *parts: str) -> str:
    """Join S3 URL parts with single slashes.

    >>> s3_join("s3://b/p/", "/x/", "y")
    's3://b/p/x/y'
    """
    out = base.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out += "/" + p
    return out


def relative_key(prefix_key: str, key: str) -> str:
    """Where object ``key`` lands, relative to the local folder of a channel with ``prefix_key``.

    >>> relative_key("data/", "data/a/x.parquet"), relative_key("data/x.parquet", "data/x.parquet")
    ('a/x.parquet', 'x.parquet')
    """
    base = prefix_key.rsplit("/", 1)[0] + "/" if "/" in prefix_key else ""
    return key[len(base) :]


def list_objects(url: str, s3: Any = None) -> list[dict]:
    """Every object under the prefix of ``url`` (``Key``, ``Size``), sorted by key."""
    bucket, prefix = split_s3(url)
    s3 = s3 or client("s3")
    out: list[dict] = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend({"Key": o["Key"], "Size": o["Size"]} for o in page.get("Contents", []))
    except Exception as exc:
        raise StorageError(f"cannot list {url}: {exc}") from exc
    return sorted(out, key=lambda o: o["Key"])


def has_objects(url: str, s3: Any = None) -> bool:
    bucket, prefix = split_s3(url)
    s3 = s3 or client("s3")
    try:
        return s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0
    except Exception as exc:
        raise StorageError(f"cannot list {url}: {exc}") from exc


def is_object(url: str, s3: Any = None) -> bool:
    """True when ``url`` names one existing object (not a prefix)."""
    bucket, key = split_s3(url)
    if not key or key.endswith("/"):
        return False
    s3 = s3 or client("s3")
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except Exception:
        return False


def upload_file(path: str, url: str, s3: Any = None) -> str:
    bucket, key = split_s3(url)
    s3 = s3 or client("s3")
    try:
        s3.upload_file(str(path), bucket, key)
    except Exception as exc:
        raise StorageError(f"cannot upload {path} to {url}: {exc}; check the bucket and your rights") from exc
    return url


def upload_bytes(data: bytes, url: str, s3: Any = None) -> str:
    bucket, key = split_s3(url)
    s3 = s3 or client("s3")
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as exc:
        raise StorageError(f"cannot write {url}: {exc}; check the bucket and your rights") from exc
    return url


def local_files(root: str) -> Iterable[tuple[str, str]]:
    """``(absolute path, path relative to root with /)`` of every file under ``root``, sorted."""
    found = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(folder, name)
            found.append((full, os.path.relpath(full, root).replace(os.sep, "/")))
    return sorted(found, key=lambda t: t[1])


def upload_tree(root: str, url: str, s3: Any = None, select: Callable[[str], bool] | None = None) -> int:
    """Upload every file under local folder ``root`` to prefix ``url``; returns the count."""
    s3 = s3 or client("s3")
    n = 0
    for full, rel in local_files(root):
        if select is None or select(rel):
            upload_file(full, s3_join(url, rel), s3)
            n += 1
    return n


def download_prefix(
    url: str, dest: str, s3: Any = None, select: Callable[[int, str], bool] | None = None
) -> list[str]:
    """Download the objects under ``url`` into ``dest`` (SageMaker ``S3Prefix`` layout). ``select(i,
    key)`` keeps the i-th object (sorted by key) or not. Returns the local paths written."""
    bucket, prefix = split_s3(url)
    s3 = s3 or client("s3")
    written = []
    for i, obj in enumerate(o for o in list_objects(url, s3) if not o["Key"].endswith("/")):
        if select is not None and not select(i, obj["Key"]):
            continue
        target = os.path.join(dest, *relative_key(prefix, obj["Key"]).split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            s3.download_file(bucket, obj["Key"], target)
        except Exception as exc:
            raise StorageError(f"cannot download s3://{bucket}/{obj['Key']}: {exc}") from exc
        written.append(target)
    return written


def ensure_bucket(bucket: str, region: str, s3: Any = None) -> None:
    """Create ``bucket`` if it does not exist (as the SageMaker SDK does with its default bucket)."""
    s3 = s3 or client("s3", region)
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except Exception:
        pass
    kwargs: dict = {"Bucket": bucket}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**kwargs)
        log.info("created staging bucket s3://%s", bucket)
    except Exception as exc:
        raise StorageError(
            f"cannot create staging bucket {bucket}: {exc}; pass --sagemaker-staging s3://<bucket>/<prefix>"
        ) from exc

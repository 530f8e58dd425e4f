"""One way to reach storage: fsspec for local paths and ``s3://`` alike.

The S3 endpoint follows the AWS SDK conventions (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``),
so the same code talks to real S3, MinIO or a moto server with configuration only.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec

from embedkit.errors import StorageError

S3_SCHEMES = ("s3://", "s3a://")


def is_remote(url: str) -> bool:
    """True for ``s3://`` (and other fsspec protocol) URLs, False for local paths."""
    return "://" in str(url) and not str(url).startswith("file://")


def s3_endpoint_url() -> str | None:
    """The S3 endpoint from the environment, as the AWS SDKs read it."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options(url: str, region: str | None = None) -> dict[str, Any]:
    """fsspec storage options for ``url`` (endpoint and region for S3, nothing for local).

    ``region`` overrides ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (the img2dataset CLIP job's
    ``--aws_region``)."""
    if str(url).startswith(S3_SCHEMES):
        opts: dict[str, Any] = {}
        endpoint = s3_endpoint_url()
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            opts.setdefault("client_kwargs", {})["region_name"] = region
        return opts
    return {}


def get_fs(url: str, region: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it (protocol stripped for S3)."""
    url = str(url)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if is_remote(url):
        protocol = url.split("://", 1)[0]
        if protocol == "s3a":
            protocol = "s3"
        fs = fsspec.filesystem(protocol, **storage_options(url, region))
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


def has_glob(url: str) -> bool:
    """True when ``url`` holds a glob pattern (``*``, ``?`` or ``[...]``)."""
    return any(c in str(url) for c in "*?[")


def glob_root(path: str) -> tuple[str, str]:
    """Split a glob into (folder before the first wildcard, remaining pattern).

    >>> glob_root("s3://b/data/2024-*/x.parquet")
    ('s3://b/data', '2024-*/x.parquet')
    """
    root = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
    return root, path[len(root) + 1 :]


def list_files(url: str, extensions: tuple[str, ...], region: str | None = None) -> list[tuple[str, str]]:
    """Files under ``url`` (a file, a folder searched recursively, or a glob) whose names end in one
    of ``extensions``, sorted, as ``(full_path_in_fs, name_relative_to_the_root)`` pairs.

    Hidden and ``_``-prefixed entries (``_SUCCESS``, ``.tmp``) are skipped, as pyarrow does.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "a.parquet").write_bytes(b"")
    0
    >>> [rel for _, rel in list_files(str(d), (".parquet",))]
    ['a.parquet']
    """
    fs, path = get_fs(url, region)
    fs.invalidate_cache()
    try:
        if has_glob(path):
            root, _ = glob_root(path)
            found = []
            for p in fs.glob(path):
                found.extend(fs.find(p) if fs.isdir(p) else [p])
        elif fs.isfile(path):
            return [(path, path.rsplit("/", 1)[-1])]
        elif fs.isdir(path):
            root = path
            found = fs.find(path)
        else:
            raise StorageError(f"input {url} does not exist (no file, folder or glob match)")
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"cannot list input {url}: {exc}") from exc
    out = []
    root = root.rstrip("/")
    for p in sorted(found):
        rel = p[len(root) :].lstrip("/") if p.startswith(root) else p.rsplit("/", 1)[-1]
        parts = rel.split("/")
        if any(x.startswith((".", "_")) for x in parts):
            continue
        if rel.lower().endswith(extensions):
            out.append((p, rel))
    return out


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temp file then ``os.replace`` locally, a
    single PUT (or one multipart upload, visible only when complete) on object stores."""
    try:
        if not is_remote_fs(fs):
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{os.path.basename(path)}")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)
    except Exception as exc:
        raise StorageError(f"cannot write {path}: {exc}") from exc


TMP_PREFIX = ".embedkit-tmp-"


def replace_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to the local file ``path`` through a temporary file and a rename, so that a
    reader never sees half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON with :func:`write_bytes` (atomic)."""
    write_bytes(fs, path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any | None:
    """The JSON object at ``path``, or None when it does not exist."""
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None


def remove(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Delete ``path`` if it exists; True when something was deleted."""
    try:
        fs.rm_file(path)
        return True
    except FileNotFoundError:
        return False


def list_names(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """Names of the entries in ``folder``, listed afresh (not from fsspec's cache); [] if it is absent."""
    fs.invalidate_cache(folder)
    try:
        return [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []


def is_remote_fs(fs: fsspec.AbstractFileSystem) -> bool:
    """True for an object store's filesystem, False for the local one."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol not in ("file", "local")


def join_fs(fs: fsspec.AbstractFileSystem, base: str, *parts: str) -> str:
    """Join inside a filesystem: ``/`` for object stores (paths without protocol), os.path locally."""
    if is_remote_fs(fs):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return join(base, *parts)


def older_than(fs: fsspec.AbstractFileSystem, path: str, seconds: float = 3600) -> bool:
    """True when ``path`` was last modified over ``seconds`` ago (False when that is unknown)."""
    try:
        mtime = fs.modified(path).timestamp()
    except Exception:
        return False
    return time.time() - mtime > seconds

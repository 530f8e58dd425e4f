"""Readers for img2dataset output, local or ``s3://`` alike, and a bounded concurrent URL fetcher.

The three layouts img2dataset writes or reads (see docs/images.md):

- **webdataset**: ``NNNNN.tar`` holding ``{key}.jpg|png|webp`` + ``{key}.txt`` (caption) +
  ``{key}.json`` (metadata), with ``NNNNN.parquet`` (one row per URL tried, failed ones included) and
  ``NNNNN_stats.json`` beside. Failed downloads appear only in the parquet.
- **parquet with bytes** (``output_format=parquet``): the image in a ``jpg`` (or ``png``/``webp``)
  binary column beside the metadata columns.
- **URL list** (img2dataset's input): ``url``, ``caption``, ``key`` columns; URLs are
  ``http(s)://``, ``s3://``, ``file://`` or paths (relative ones from the list's folder).

Every row becomes one :class:`ImageRecord`: its bytes, its metadata, or the reason it has none
(``download failed: ...`` for rows img2dataset marked failed, ``missing image: ...``,
``fetch failed: ...``, ``oversized image: ...``). Decoding happens later, in the engine.

>>> META_COLUMNS[:3]
('key', 'caption', 'url')
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from embedkit.errors import InvalidImageError
from embedkit.io.fs import get_fs, is_remote

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # webdataset members holding the image
IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image")  # parquet columns holding image bytes
# img2dataset's metadata columns, kept in the output with these types (null where unknown).
META_TYPES: dict[str, pa.DataType] = {
    "key": pa.string(),
    "caption": pa.string(),
    "url": pa.string(),
    "status": pa.string(),
    "error_message": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
    "original_width": pa.int64(),
    "original_height": pa.int64(),
    "exif": pa.string(),
    "sha256": pa.string(),
}
META_COLUMNS = tuple(META_TYPES)
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20


@dataclass
class ImageRecord:
    """One row of an image dataset: where it came from, its bytes (or why not), its metadata."""

    row: int
    data: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # reason it cannot be embedded, known before decoding

    @property
    def key(self) -> str | None:
        k = self.meta.get("key")
        return None if k is None else str(k)


def meta_arrays(records: Sequence[ImageRecord]) -> dict[str, pa.Array]:
    """The metadata columns of ``records``, typed as :data:`META_TYPES` (values that do not fit the
    type, such as a dict in ``exif``, are written as JSON text)."""
    out: dict[str, pa.Array] = {}
    for name, typ in META_TYPES.items():
        values = [_coerce(r.meta.get(name), typ) for r in records]
        out[name] = pa.array(values, typ)
    return out


def _coerce(value: Any, typ: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_integer(typ):
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return json.dumps(value, default=str)


def _failed_status(meta: dict[str, Any]) -> str | None:
    """``download failed: <error_message>`` for a row img2dataset marked as not a success."""
    status = meta.get("status")
    if status is None or status == "success":
        return None
    return f"download failed: {meta.get('error_message') or status}"


# ----------------------------------------------------------------------------------- webdataset
def split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name; the rest is the
    extension. ``'a/000012.jpg'`` -> ``('a/000012', 'jpg')``."""
    prefix, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{prefix}/{stem}" if prefix else stem), ext.lower()


def read_tar(blob: bytes) -> tuple[dict[str, dict[str, bytes]], list[str], str | None]:
    """Members of a webdataset tar grouped by key: ``(samples, keys in tar order, error)``. A tar
    damaged part way keeps the samples read before the damage and says what went wrong."""
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    error = None
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member(member.name)
                fh = tar.extractfile(member)
                data = fh.read() if fh is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is cut short")
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        error = f"the tar is damaged after {len(order)} sample(s): {exc}"
    return samples, order, error


def _image_of(sample: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


def _sample_meta(sample: dict[str, bytes]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            obj = json.loads(sample["json"])
            if isinstance(obj, dict):
                meta.update({k: obj[k] for k in META_COLUMNS if k in obj})
        except ValueError:
            pass
    if "txt" in sample and meta.get("caption") is None:
        meta["caption"] = sample["txt"].decode("utf-8", "replace")
    return meta


def read_webdataset(
    fs: fsspec.AbstractFileSystem, tar_path: str, tar_name: str, index: pa.Table | None
) -> list[ImageRecord]:
    """Every row of one webdataset shard. With the shard's parquet (``index``), rows are the
    parquet's rows (failed downloads included, rejected with their error_message) followed by any
    tar sample the parquet does not list; without it, rows are the tar's samples in order."""
    samples, order, tar_error = read_tar(fs.cat_file(tar_path))
    if tar_error:
        log.warning("%s: %s", tar_name, tar_error)
    records: list[ImageRecord] = []
    listed: set[str] = set()
    if index is not None:
        cols = [c for c in META_COLUMNS if c in index.column_names]
        rows = index.select(cols).to_pylist()
        for i, meta in enumerate(rows):
            key = None if meta.get("key") is None else str(meta["key"])
            sample = samples.get(key or "", {})
            listed.add(key or "")
            merged = {**_sample_meta(sample), **{k: v for k, v in meta.items() if v is not None}}
            rec = ImageRecord(row=i, data=_image_of(sample), meta=merged)
            rec.error = _failed_status(merged)
            if rec.error is None and rec.data is None:
                rec.error = _missing(key, tar_name, tar_error)
            records.append(rec)
    for key in order:
        if key in listed:
            continue
        sample = samples[key]
        meta = {"key": key, **_sample_meta(sample)}
        meta["key"] = meta.get("key") or key
        rec = ImageRecord(row=len(records), data=_image_of(sample), meta=meta)
        rec.error = _failed_status(meta) or (None if rec.data is not None else _missing(key, tar_name, None))
        records.append(rec)
    return records


def _missing(key: str | None, tar_name: str, tar_error: str | None) -> str:
    if key is None:
        return f"missing image: the row has no key to find it in {tar_name}"
    why = f" ({tar_error})" if tar_error else ""
    return f"missing image: no {key}.jpg|png|webp in {tar_name}{why}"


# ------------------------------------------------------------------------ parquet / URL lists
def image_column(columns: Sequence[str], schema: pa.Schema | None = None) -> str | None:
    """The column holding image bytes, if any (``jpg``, ``png``, ``webp``, ``jpeg``, ``image``)."""
    for name in IMAGE_COLUMNS:
        if name in columns:
            if schema is None:
                return name
            typ = schema.field(name).type
            if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
                return name
    return None


def records_from_rows(
    metas: Sequence[dict[str, Any]], datas: Sequence[Any] | None, start: int, img_col: str | None
) -> list[ImageRecord]:
    """Rows of a parquet with image bytes (``datas`` from ``img_col``) or of a URL list (``datas``
    None): rows img2dataset marked failed, and null image cells, carry their reason."""
    out = []
    for i, meta in enumerate(metas):
        data = datas[i] if datas is not None else None
        rec = ImageRecord(row=start + i, data=data, meta={k: v for k, v in meta.items() if k in META_TYPES})
        rec.error = _failed_status(rec.meta)
        if rec.error is None and img_col and data is None:
            rec.error = f"missing image: column {img_col!r} is null"
        out.append(rec)
    return out


def read_index(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    """The metadata parquet beside a webdataset tar (only the metadata columns)."""
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        names = [c for c in META_COLUMNS if c in pf.schema_arrow.names]
        return pf.read(columns=names)


# ---------------------------------------------------------------------------------- fetching
@dataclass(frozen=True)
class FetchSettings:
    """How URLs are fetched: parallelism, per-try timeout (seconds), retries, size cap (bytes)."""

    workers: int = 16
    timeout: float = 10.0
    retries: int = 2
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    backoff: float = 0.5  # seconds before the first retry, doubled after each
    schemes: tuple[str, ...] = ("http", "https", "s3", "file")


class _Retry(Exception):
    """A failure worth another try (timeout, connection error, 429, 5xx)."""


class Fetcher:
    """Fetch image bytes from ``http(s)://``, ``s3://``, ``file://`` URLs or paths, concurrently.

    ``workers`` fetches run at once; each try has ``timeout`` seconds overall (connect, headers and
    body together); transient failures are retried ``retries`` times with exponential backoff;
    bodies over ``max_bytes`` are refused without reading the rest. Relative paths are read from
    ``base`` (the folder of the URL list). Failures raise
    :class:`~embedkit.errors.InvalidImageError` (``fetch failed``, ``oversized image``).

    >>> with Fetcher(FetchSettings(workers=2)) as f:          # doctest: +SKIP
    ...     blobs = f.fetch_many(["https://example.com/a.jpg", "s3://bucket/b.jpg"])
    """

    def __init__(self, settings: FetchSettings | None = None, *, base: str | None = None) -> None:
        self.settings = settings or FetchSettings()
        self.base = base
        self._pool = ThreadPoolExecutor(max(1, self.settings.workers), thread_name_prefix="embedkit-fetch")
        self._http: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._http is not None:
            self._http.close()

    def fetch_many(
        self, urls: Sequence[str | None], *, base: str | None = None
    ) -> list[bytes | InvalidImageError]:
        """Bytes (or the error) for each URL, in order; at most ``workers`` fetches at once.
        Relative paths are read from ``base`` (default: the fetcher's own)."""
        return list(self._pool.map(lambda u: self._try_fetch(u, base), urls))

    def _try_fetch(self, url: str | None, base: str | None) -> bytes | InvalidImageError:
        try:
            return self.fetch(url, base=base)
        except InvalidImageError as exc:
            return exc

    def fetch(self, url: str | None, *, base: str | None = None) -> bytes:
        """The bytes at ``url``, with retries; raises :class:`InvalidImageError`."""
        if url is None or not str(url).strip():
            raise InvalidImageError("missing image", "the row has no url")
        url = str(url).strip()
        scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
        if scheme not in self.settings.schemes:
            allowed = ", ".join(f"{s}://" for s in self.settings.schemes)
            raise InvalidImageError(
                "fetch failed", f"{url}: scheme {scheme}:// not allowed (allowed: {allowed})"
            )
        delay = self.settings.backoff
        for attempt in range(self.settings.retries + 1):
            try:
                if scheme in ("http", "https"):
                    return self._http_get(url)
                return self._fs_get(url, base or self.base)
            except _Retry as exc:
                if attempt >= self.settings.retries:
                    tries = f" (after {attempt + 1} tries)" if attempt else ""
                    raise InvalidImageError("fetch failed", f"{url}: {exc}{tries}") from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _client(self) -> Any:
        with self._lock:
            if self._http is None:
                import httpx

                n = max(1, self.settings.workers)
                self._http = httpx.Client(
                    timeout=httpx.Timeout(self.settings.timeout),
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                    follow_redirects=True,
                    headers={"User-Agent": "embedkit (image embedding job)"},
                )
            return self._http

    def _http_get(self, url: str) -> bytes:
        import httpx

        cap = self.settings.max_bytes
        deadline = time.monotonic() + self.settings.timeout
        try:
            with self._client().stream("GET", url) as resp:
                status = resp.status_code
                if status == 429 or status >= 500:
                    raise _Retry(f"HTTP {status}")
                if status >= 400:
                    raise InvalidImageError("fetch failed", f"{url}: HTTP {status}")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > cap:
                    raise InvalidImageError(
                        "oversized image", f"{url}: {declared} bytes, over the limit of {cap}"
                    )
                chunks, size = [], 0
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise InvalidImageError(
                            "oversized image", f"{url}: more than the limit of {cap} bytes"
                        )
                    if time.monotonic() > deadline:
                        raise _Retry(f"timed out after {self.settings.timeout:g}s")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException:
            raise _Retry(f"timed out after {self.settings.timeout:g}s") from None
        except httpx.TransportError as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:  # invalid URL and the like: no point retrying
            raise InvalidImageError("fetch failed", f"{url}: {type(exc).__name__}: {exc}") from None

    def _fs_get(self, url: str, base: str | None) -> bytes:
        target = url
        if "://" not in url and not os.path.isabs(url) and base is not None:
            target = base.rstrip("/") + "/" + url if is_remote(base) else os.path.join(base, url)
        cap = self.settings.max_bytes
        try:
            fs, path = get_fs(target)
            size = fs.size(path)
            if size is not None and size > cap:
                raise InvalidImageError("oversized image", f"{url}: {size} bytes, over the limit of {cap}")
            return fs.cat_file(path)
        except InvalidImageError:
            raise
        except FileNotFoundError:
            raise InvalidImageError("fetch failed", f"{url}: no such file or object") from None
        except PermissionError as exc:
            raise InvalidImageError("fetch failed", f"{url}: permission denied: {exc}") from None
        except (TimeoutError, ConnectionError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:
            raise InvalidImageError("fetch failed", f"{url}: {type(exc).__name__}: {exc}") from None

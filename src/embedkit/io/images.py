"""Readers for img2dataset output, local or ``s3://`` alike (URLs are fetched by :mod:`embedkit.io.fetch`).

The layouts (webdataset shards, parquet with image bytes, URL lists) are tabled in docs/images.md.
Every row becomes one :class:`ImageRecord`: its bytes and metadata, or the reason it has none;
decoding happens later, on the engine's decode pool.

>>> META_COLUMNS[:3]
('key', 'caption', 'url')
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

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

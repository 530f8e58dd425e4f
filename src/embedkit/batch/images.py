"""Image datasets in the batch job: img2dataset shards and URL lists, embedded with a CLIP model.

The text job's machinery (units, parts, rejects, resume, shards) with its own reading and embedding:
a unit is a webdataset shard or a row range of a parquet with image bytes or of a URL list
(outputs and rejects: docs/images.md).

>>> from embedkit.batch import embed_dataset
>>> embed_dataset("s3://bucket/laion-shards/", "s3://bucket/out/", model="./clip")   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from embedkit.batch.pipeline import Outputs, UnitPipeline
from embedkit.batch.plan import Plan, Unit, add_units, count_or_reject, describe_files, row_ranges
from embedkit.batch.prepare import Prepared
from embedkit.batch.settings import JobSettings
from embedkit.errors import ConfigError, InputError
from embedkit.io.fetch import Fetcher, FetchSettings
from embedkit.io.fs import get_fs, is_remote, is_remote_fs, list_files
from embedkit.io.images import (
    META_COLUMNS,
    ImageRecord,
    image_column,
    meta_arrays,
    read_index,
    read_webdataset,
    records_from_rows,
)
from embedkit.io.readers import EXTENSIONS, FileInfo, describe_file, read_rows

log = logging.getLogger("embedkit.batch")

IMAGE_UNIT_ROWS = 2048  # rows per unit at most: a unit's images are held (compressed) in memory
_TEXT_ONLY_COLUMNS = ("text", "texto", "sentence", "content")


# ------------------------------------------------------------------------------ modality
def detect_modality(input_url: str, region: str | None = None) -> tuple[str, str]:
    """``("image" | "text", why)`` from the data: webdataset ``.tar`` shards, a parquet with an image
    bytes column, or a URL list (a ``url`` column and no text column but ``caption``) are images."""
    listed = list_files(input_url, (*EXTENSIONS, ".tar"), region)
    tars = [rel for _p, rel in listed if rel.lower().endswith(".tar")]
    if tars:
        return "image", f"webdataset shards ({tars[0]}...)"
    fs, _ = get_fs(input_url, region)
    for path, rel in listed[:3]:
        info = describe_file(fs, path, rel)
        if info.error:
            continue
        col = image_column(info.columns)
        if col:
            return "image", f"{rel} has an image bytes column {col!r}"
        if "url" in info.columns and not any(c in info.columns for c in _TEXT_ONLY_COLUMNS):
            return "image", f"{rel} is a URL list (url column, no text column)"
        return "text", f"{rel} has no image column"
    return "text", "no image dataset layout found"


def resolve_modality(settings: JobSettings, embedder: Any) -> str:
    """The modality the job runs: ``--modality``, or detected; checks the model can do it."""
    from embedkit.engine.image import ImageEmbedder

    is_clip = isinstance(embedder, ImageEmbedder)
    wanted = settings.modality
    if wanted == "text":  # (JobSettings refuses --embed-captions with --modality text)
        return "text"
    if wanted == "image":
        why = "--modality image"
    else:
        wanted, why = detect_modality(settings.input, settings.aws_region)  # type: ignore[arg-type]
    if wanted == "text":
        if settings.embed_captions:
            raise ConfigError(f"--embed-captions applies to image datasets; {settings.input} is text ({why})")
        return "text"
    engine = getattr(settings, "engine", "local")
    if engine != "local" and (is_clip or settings.modality == "image" or "URL list" not in why):
        raise ConfigError(
            f"{settings.input} is an image dataset ({why}); --engine {engine} runs text datasets only. "
            f"Use --engine local (one engine; fetching and decoding overlap the model), and --num-shards "
            f"to spread the units over several hosts"
        )
    if not is_clip:
        url_list = "URL list" in why
        if url_list and settings.modality == "auto":
            log.warning(
                "%s looks like an image URL list (%s) but %s is a text model: embedding its captions as "
                "text. Use a CLIP model (--model ./clip-dir) to embed the images",
                settings.input,
                why,
                embedder.model.name,
            )
            return "text"
        raise ConfigError(
            f"{settings.input} is an image dataset ({why}) but {embedder.model.name} is a text model; embed "
            f"it with a CLIP-family model (--model ./clip-dir or s3://.../model.tar.gz)"
            + ("" if settings.modality == "image" else ", or pass --modality text to embed captions")
        )
    log.info("modality: image (%s)", why)
    return "image"


# ---------------------------------------------------------------------------------- plan
@dataclass
class ShardInfo(FileInfo):
    """An input file of an image dataset and its layout (``webdataset``, ``bytes``, ``urls``)."""

    layout: str = "urls"
    index_path: str | None = None  # the parquet beside a webdataset tar
    image_column: str | None = None


@dataclass
class ImagePlan(Plan):
    """A plan over image units; adds the job's image options to its fingerprint and metadata."""

    embed_captions: bool = False
    fetch: FetchSettings = field(default_factory=FetchSettings)
    modality: str = "image"

    @property
    def fingerprint_extra(self) -> dict[str, Any]:
        return {
            "modality": "image",
            "embed_captions": self.embed_captions,
            "max_image_bytes": self.fetch.max_bytes,
        }

    @property
    def metadata_extra(self) -> dict[str, Any]:
        layouts = Counter(f.layout for f in self.files if isinstance(f, ShardInfo))
        return {
            "modality": "image",
            "images": {
                "layouts": dict(layouts),
                "embed_captions": self.embed_captions,
                "caption_column": "caption_embedding" if self.embed_captions else None,
                "fetch": dataclasses.asdict(self.fetch),
            },
        }


def make_image_plan(settings: JobSettings) -> ImagePlan:
    """List an image dataset and cut it into units (one per webdataset shard, row ranges of
    parquet-with-bytes files and URL lists)."""
    keep = tuple(settings.keep_columns or ())
    extra = [c for c in keep if c not in META_COLUMNS]
    if extra:
        raise ConfigError(
            f"--keep-columns {', '.join(extra)}: image jobs keep img2dataset's metadata columns "
            f"({', '.join(META_COLUMNS)}) and no others"
        )
    if settings.id_column and settings.id_column not in META_COLUMNS:
        raise ConfigError(f"--id-column for image datasets must be one of {', '.join(META_COLUMNS)}")
    region = settings.aws_region
    fs, _ = get_fs(settings.input, region)  # type: ignore[arg-type]
    listed = list_files(settings.input, (*EXTENSIONS, ".tar"), region)  # type: ignore[arg-type]
    if not listed:
        raise InputError(f"no input files under {settings.input} (looked for .tar, .parquet, .jsonl, .csv)")
    paths = {p for p, _ in listed}
    tables = [(p, r) for p, r in listed if not r.lower().endswith(".tar")]
    indexes: dict[str, str] = {}  # tar path -> its parquet
    for path, _rel in listed:
        if path.lower().endswith(".tar"):
            sibling = path[:-4] + ".parquet"
            if sibling in paths or fs.exists(sibling):
                indexes[path] = sibling
    index_paths = set(indexes.values())
    infos = describe_files(fs, [(p, r) for p, r in tables if p not in index_paths])
    by_path = {i.path: i for i in infos}
    files: list[ShardInfo] = []
    for path, rel in listed:
        if path in index_paths:
            continue
        if path.lower().endswith(".tar"):
            files.append(_tar_info(fs, path, rel, indexes.get(path)))
        else:
            files.append(_table_info(by_path[path]))
    files.sort(key=lambda f: f.source)
    rows = min(settings.unit_rows, IMAGE_UNIT_ROWS)
    units: list[Unit] = []
    budget = settings.max_samples
    for info in files:
        if budget is not None and budget <= 0:
            break
        if info.error is not None:
            if settings.fail_fast:
                raise InputError(f"{info.source}: {info.error} (--fail-fast)", file=info.source)
            units.append(Unit(info.source, 0, None, info, error=info.error))
            continue
        # A CSV / JSON Lines URL list is counted first; one that cannot be read becomes an error unit.
        if info.layout == "urls" and info.num_rows is None and not count_or_reject(fs, info, units):
            continue
        spans = [(0, info.num_rows)] if info.layout == "webdataset" else row_ranges(info, rows)
        budget = add_units(units, info, spans, budget)
    fetch = FetchSettings(
        workers=settings.fetch_workers,
        timeout=settings.fetch_timeout,
        retries=settings.fetch_retries,
        max_bytes=settings.max_image_bytes,
    )
    id_col = settings.id_column or "key"
    return ImagePlan(
        input=settings.input,  # type: ignore[arg-type]
        units=units,
        files=files,  # type: ignore[arg-type]
        text_column="caption",
        id_column=id_col,
        keep_columns=(),
        fs=fs,
        embed_captions=settings.embed_captions,
        fetch=fetch,
    )


def _tar_info(fs: Any, path: str, rel: str, index: str | None) -> ShardInfo:
    info = ShardInfo(
        path, rel, "webdataset", layout="webdataset", index_path=index, columns=list(META_COLUMNS)
    )
    if index is not None:
        meta = describe_file(fs, index, rel[:-4] + ".parquet")
        if meta.error:
            info.error = f"unreadable: {meta.error} (the parquet beside the tar)"
        else:
            info.num_rows = meta.num_rows
    return info


def _table_info(info: FileInfo) -> ShardInfo:
    out = ShardInfo(**{f.name: getattr(info, f.name) for f in dataclasses.fields(FileInfo)})
    if info.error is not None:
        out.error = f"unreadable: {info.error}"
        return out
    col = image_column(info.columns)
    if col:
        out.layout, out.image_column = "bytes", col
    elif "url" in info.columns:
        out.layout = "urls"
    else:
        out.error = (
            f"not an image dataset file: no jpg/png/webp column, no url column and no .tar beside it "
            f"(columns: {', '.join(info.columns)})"
        )
    return out


# ------------------------------------------------------------------------------- prepare
def read_image_unit(plan: ImagePlan, unit: Unit, fetcher: Fetcher) -> list[ImageRecord]:
    """Read ``unit``'s rows and their image bytes (fetching URLs: a failed fetch is the record's
    ``error``); raises on an unreadable file. Decoding happens later, on the engine's decode pool."""
    info: ShardInfo = unit.file  # type: ignore[assignment]
    fs = plan.fs
    if info.layout == "webdataset":
        index = read_index(fs, info.index_path) if info.index_path else None
        records = read_webdataset(fs, info.path, info.source, index)
        # A whole shard also keeps the tar samples its parquet does not list (rows after its own).
        whole = unit.start == 0 and unit.stop in (None, info.num_rows)
        return [r for r in records if whole or unit.start <= r.row < (unit.stop or 0)]
    cols = [c for c in META_COLUMNS if c in info.columns]
    img_col = info.image_column
    block = read_rows(fs, info, [*cols, *([img_col] if img_col else [])], unit.start, unit.stop)
    metas = [{c: block.columns[c][i] for c in cols} for i in range(block.num_rows)]
    records = records_from_rows(metas, block.columns[img_col] if img_col else None, unit.start, img_col)
    if info.layout == "urls":
        _fetch(records, fetcher, _base_of(fs, info.path))
    return records


def prepare_image_unit(plan: ImagePlan, unit: Unit, records: list[ImageRecord]) -> Prepared:
    """``records`` with usable bytes become ``Prepared.records`` (one per valid row, aligned with
    ``ids``); the others are rejected with their reason."""
    cap = plan.fetch.max_bytes
    out = Prepared(unit=unit, rows_in=len(records))
    id_col = plan.id_column or "key"
    for rec in records:
        rid = rec.meta.get(id_col)
        sid = str(rid) if rid is not None else f"{unit.source}:{rec.row}"
        if rec.error is None and rec.data is not None and len(rec.data) > cap:
            rec.error = f"oversized image: {len(rec.data)} bytes, over the limit of {cap} (--max-image-bytes)"
        if rec.error is not None:
            out.rejects.append((unit.source, rec.row, sid, rec.error))
        else:
            out.ids.append(sid)
            out.records.append(rec)
    out.rows_rejected = len(out.rejects)
    return out


def _fetch(records: list[ImageRecord], fetcher: Fetcher, base: str) -> None:
    todo = [r for r in records if r.error is None]
    blobs = fetcher.fetch_many([r.meta.get("url") for r in todo], base=base)
    for rec, blob in zip(todo, blobs, strict=True):
        if isinstance(blob, bytes):
            rec.data = blob
        else:
            rec.error = blob.reason


def _base_of(fs: Any, path: str) -> str:
    folder = posixpath.dirname(path)
    if not is_remote_fs(fs):
        return folder
    url = fs.unstrip_protocol(folder)
    return url if is_remote(url) else folder


# ------------------------------------------------------------------------------ modality
class ImageModality:
    """Images (:class:`~embedkit.batch.pipeline.Modality`): read + fetch on the reader thread,
    decode on the engine's pool, CLIP on the calling thread; with ``embed_captions`` the captions'
    CLIP text vectors too."""

    name = "image"

    def __init__(self) -> None:
        self.fetcher: Fetcher | None = None  # made by the reader thread's first unit

    def plan(self, settings: JobSettings) -> ImagePlan:
        return make_image_plan(settings)

    def read(self, pipeline: UnitPipeline, unit: Unit) -> list[ImageRecord]:
        plan: ImagePlan = pipeline.plan  # type: ignore[assignment]
        if self.fetcher is None:
            self.fetcher = Fetcher(plan.fetch)
        return read_image_unit(plan, unit, self.fetcher)

    def prepare(self, pipeline: UnitPipeline, unit: Unit, records: list[ImageRecord]) -> Prepared:
        return prepare_image_unit(pipeline.plan, unit, records)  # type: ignore[arg-type]

    def embed(self, pipeline: UnitPipeline, p: Prepared) -> Outputs | None:
        emb, progress = pipeline.embedder, pipeline.progress
        if not p.records:  # nothing to embed: the unit writes rejects only
            return {"dense": np.empty((0, emb.dimension), np.float32)}
        result = emb.embed_encoded(
            (r.data for r in p.records), stop=pipeline.stop.is_set, on_batch=lambda n: progress.add(rows=n)
        )
        if result is None:
            return None
        src = p.unit.source
        failed = [(src, p.records[i].row, p.ids[i], e.reason) for i, e in sorted(result.failures.items())]
        p.drop(failed, result.ok)
        if failed:
            progress.add(rejects=len(failed))
            pipeline.check(p)
        p.extra = meta_arrays(p.records)
        if pipeline.plan.embed_captions:  # type: ignore[attr-defined]
            p.extra["caption_embedding"] = _captions(emb, p.records, pipeline.settings.dtype)
        p.records = []  # the bytes are not needed any more; the writer holds only the table
        return {"dense": result.vectors}

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()


def _captions(emb: Any, records: list[ImageRecord], dtype: str) -> pa.Array:
    """The captions' CLIP text vectors (null where a row has no caption)."""
    texts = [r.meta.get("caption") for r in records]
    idx = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    n, dim = len(records), emb.dimension
    full = np.zeros((n, dim), dtype=np.dtype(dtype))
    if idx:
        full[idx] = emb.embed_tokenized(emb.tokenize([texts[i] for i in idx], truncate=True, field="caption"))
    values = pa.array(full.reshape(-1), pa.float32() if dtype == "float32" else pa.float16())
    valid = np.isin(np.arange(n), idx)
    mask = pa.array(~valid) if n and not valid.all() else None
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=mask)

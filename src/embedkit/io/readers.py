"""Streaming readers for text datasets: Parquet, JSON Lines and CSV, local or ``s3://`` alike.

A file is described once (:func:`describe_file`) and then read by row range (:func:`read_rows`), so
memory is bounded by a unit, never by the file: Parquet seeks to the row groups of the range, CSV and
JSON Lines stream from the start (or from where the previous range of that file ended).

>>> import tempfile, os, pyarrow as pa, pyarrow.parquet as pq
>>> d = tempfile.mkdtemp(); path = os.path.join(d, "a.parquet")
>>> pq.write_table(pa.table({"text": ["a", "b", "c"]}), path)
>>> from embedkit.io.fs import get_fs
>>> fs, p = get_fs(path)
>>> info = describe_file(fs, p, "a.parquet")
>>> info.num_rows, info.columns
(3, ['text'])
>>> read_rows(fs, info, ["text"], 1, 3).texts("text")
['b', 'c']
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

# File name endings the batch job reads, and the format each one means.
FORMATS: dict[str, str] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson.gz": "jsonl",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".tsv": "tsv",
    ".tsv.gz": "tsv",
}
EXTENSIONS = tuple(FORMATS)
_READ_BATCH = 8192


def format_of(name: str) -> str | None:
    """The format a file name means (``parquet``, ``jsonl``, ``csv``, ``tsv``), or None."""
    low = name.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if low.endswith(ext):
            return FORMATS[ext]
    return None


@dataclass
class FileInfo:
    """What a batch job needs to know about one input file before reading it."""

    path: str  # path inside its filesystem
    source: str  # name relative to the input root: what rejects and default ids show
    fmt: str
    size: int | None = None
    columns: list[str] = field(default_factory=list)
    num_rows: int | None = None  # known for Parquet, counted on demand for CSV / JSON Lines
    row_groups: list[int] = field(default_factory=list)  # rows per Parquet row group
    error: str | None = None  # set when the file cannot be read at all


@dataclass
class RowBlock:
    """Rows ``start .. start + len`` of one file: column values as Python lists, plus rows that
    could not be parsed (JSON Lines) with the parser's reason."""

    source: str
    start: int
    columns: dict[str, list[Any]]
    num_rows: int
    errors: dict[int, str] = field(default_factory=dict)  # local index -> reason
    arrow: dict[str, pa.Array] = field(default_factory=dict)  # pass-through columns, Arrow-typed

    def texts(self, column: str) -> list[Any]:
        return self.columns[column]


def _open(fs: fsspec.AbstractFileSystem, path: str, fmt: str):
    compression = "gzip" if path.lower().endswith(".gz") else None
    return fs.open(path, "rb", compression=compression)


def describe_file(
    fs: fsspec.AbstractFileSystem, path: str, source: str, *, size: int | None = None
) -> FileInfo:
    """Columns (and for Parquet, rows and row groups) of one file; ``error`` set if unreadable."""
    fmt = format_of(path) or "parquet"
    info = FileInfo(path=path, source=source, fmt=fmt, size=size)
    try:
        if fmt == "parquet":
            with fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                info.columns = list(meta.schema.to_arrow_schema().names)
                info.num_rows = int(meta.num_rows)
                info.row_groups = [int(meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
        elif fmt == "jsonl":
            info.columns = _jsonl_columns(fs, path)
        else:
            with _open(fs, path, fmt) as fh:
                reader = pacsv.open_csv(fh, parse_options=_csv_parse(fmt))
                info.columns = list(reader.schema.names)
    except Exception as exc:
        info.error = f"{type(exc).__name__}: {exc}"
    return info


def _jsonl_columns(fs: fsspec.AbstractFileSystem, path: str, sample: int = 100) -> list[str]:
    """Keys seen in the first ``sample`` records of a JSON Lines file, in first-seen order. Lines
    that do not parse are skipped here (they are rejected row by row when read); a file where no
    sampled line parses is unreadable."""
    seen: dict[str, None] = {}
    n = bad = 0
    first_error = ""
    with _open(fs, path, "jsonl") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                obj, first_error = None, first_error or str(exc)
            if isinstance(obj, dict):
                seen.update(dict.fromkeys(obj))
                n += 1
            else:
                bad += 1
                first_error = first_error or f"a JSON {type(obj).__name__}, not an object"
            if n + bad >= sample:
                break
    if bad and not n:
        raise ValueError(f"no JSON object in the first {bad} line(s): {first_error}")
    return list(seen)


def count_rows(fs: fsspec.AbstractFileSystem, info: FileInfo) -> int:
    """Rows in a file, reading it through once for CSV / JSON Lines (free for Parquet)."""
    if info.num_rows is not None:
        return info.num_rows
    if info.fmt == "jsonl":
        with _open(fs, info.path, info.fmt) as fh:
            info.num_rows = sum(1 for raw in fh if raw.strip())
    else:
        n = 0
        with _open(fs, info.path, info.fmt) as fh:
            for batch in pacsv.open_csv(fh, parse_options=_csv_parse(info.fmt)):
                n += batch.num_rows
        info.num_rows = n
    return info.num_rows


def _csv_parse(fmt: str) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)


def read_rows(
    fs: fsspec.AbstractFileSystem,
    info: FileInfo,
    columns: list[str],
    start: int,
    stop: int | None,
    *,
    arrow_columns: tuple[str, ...] = (),
    streams: StreamCache | None = None,
) -> RowBlock:
    """Rows ``[start, stop)`` of ``info`` (``stop=None``: to the end).

    ``columns`` come back as Python lists (``block.columns``), ``arrow_columns`` as Arrow arrays
    keeping their type (``block.arrow``, for pass-through). CSV / JSON Lines are read from an open
    stream kept in ``streams`` when the range continues where the previous one of that file ended
    (so consecutive units of a large file read it once). Raises whatever the parser raises on a
    corrupt file."""
    wanted = list(dict.fromkeys([*columns, *arrow_columns]))
    if info.fmt == "parquet":
        table = _concat(list(_parquet_batches(fs, info, wanted, start, stop)), wanted)
        return _block(info, start, table, columns, arrow_columns)
    cache = streams if streams is not None else StreamCache()
    try:
        stream = cache.seek(fs, info, wanted, start)
        if info.fmt == "jsonl":
            return _read_jsonl(stream, info, wanted, columns, start, stop, arrow_columns)
        table = _concat(stream.take_batches(stop), wanted)
        return _block(info, start, table, columns, arrow_columns)
    except BaseException:
        cache.close()  # a stream that failed mid-way is not reused
        raise
    finally:
        if streams is None:
            cache.close()


def _block(info: FileInfo, start: int, table: pa.Table, columns: list[str], arrow_columns) -> RowBlock:
    block = RowBlock(
        source=info.source,
        start=start,
        columns={c: table.column(c).to_pylist() for c in columns},
        num_rows=table.num_rows,
    )
    for c in arrow_columns:
        block.arrow[c] = table.column(c).combine_chunks()
    return block


class _Stream:
    """An open CSV / JSON Lines file and the row its next read starts at."""

    def __init__(self, fs: fsspec.AbstractFileSystem, info: FileInfo, columns: list[str]) -> None:
        self.key = (info.path, tuple(columns))
        self.fh = _open(fs, info.path, info.fmt)
        self.row = 0
        self.pending: pa.RecordBatch | None = None
        if info.fmt == "jsonl":
            self.lines = iter(self.fh)
        else:
            self.batches = iter(
                pacsv.open_csv(
                    self.fh,
                    parse_options=_csv_parse(info.fmt),
                    convert_options=pacsv.ConvertOptions(
                        include_columns=columns,
                        column_types=dict.fromkeys(columns, pa.string()),
                        strings_can_be_null=False,
                    ),
                )
            )

    def next_line(self) -> bytes | None:
        """The next non-blank line (a JSON Lines row), or None at the end."""
        for raw in self.lines:
            if raw.strip():
                return raw
        return None

    def take_batches(self, stop: int | None, start: int | None = None) -> list[pa.RecordBatch]:
        """CSV batches from the current row up to ``stop`` (rows before ``start`` skipped)."""
        out: list[pa.RecordBatch] = []
        while stop is None or self.row < stop:
            if self.pending is None:
                self.pending = next(self.batches, None)
                if self.pending is None:
                    break
            batch = self.pending
            lo = max((start or 0) - self.row, 0)
            hi = batch.num_rows if stop is None else min(batch.num_rows, stop - self.row)
            if hi > lo and lo < batch.num_rows:
                out.append(batch.slice(lo, hi - lo))
            taken = min(max(hi, lo), batch.num_rows)
            self.row += taken
            self.pending = batch.slice(taken) if taken < batch.num_rows else None
        return out

    def close(self) -> None:
        self.fh.close()


class StreamCache:
    """Keeps the last CSV / JSON Lines file open between reads, positioned after the rows read,
    so a reader that takes a file's units in order parses the file once."""

    def __init__(self) -> None:
        self._stream: _Stream | None = None

    def seek(self, fs: fsspec.AbstractFileSystem, info: FileInfo, columns: list[str], start: int) -> _Stream:
        s = self._stream
        if s is None or s.key != (info.path, tuple(columns)) or s.row > start:
            self.close()
            s = self._stream = _Stream(fs, info, columns)
        if s.row < start:  # skip to the range: rows before it are parsed, not kept
            if info.fmt == "jsonl":
                while s.row < start and s.next_line() is not None:
                    s.row += 1
            else:
                s.take_batches(start, start)
        return s

    def close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            finally:
                self._stream = None


def _concat(batches: list[pa.RecordBatch], columns: list[str]) -> pa.Table:
    if not batches:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.Table.from_batches(batches)


def _parquet_batches(
    fs: fsspec.AbstractFileSystem, info: FileInfo, columns: list[str], start: int, stop: int | None
) -> Iterator[pa.RecordBatch]:
    """Only the row groups overlapping ``[start, stop)`` are read."""
    groups, first_row, offset = [], None, 0
    for i, n in enumerate(info.row_groups):
        if offset + n > start and (stop is None or offset < stop):
            groups.append(i)
            first_row = offset if first_row is None else first_row
        offset += n
    if not groups:
        return
    with fs.open(info.path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        it = pf.iter_batches(batch_size=_READ_BATCH, row_groups=groups, columns=columns)
        yield from _slice(it, int(first_row or 0), start, stop)


def _slice(
    batches: Iterator[pa.RecordBatch], first_row: int, start: int, stop: int | None
) -> Iterator[pa.RecordBatch]:
    """Cut a stream of batches that begins at row ``first_row`` down to rows ``[start, stop)``."""
    pos = first_row
    for batch in batches:
        end = pos + batch.num_rows
        if end > start:
            lo = max(start - pos, 0)
            hi = batch.num_rows if stop is None else min(batch.num_rows, stop - pos)
            if hi > lo:
                yield batch.slice(lo, hi - lo)
        pos = end
        if stop is not None and pos >= stop:
            return


def _read_jsonl(
    stream: _Stream,
    info: FileInfo,
    wanted: list[str],
    columns: list[str],
    start: int,
    stop: int | None,
    arrow_columns: tuple[str, ...],
) -> RowBlock:
    cols: dict[str, list[Any]] = {c: [] for c in wanted}
    errors: dict[int, str] = {}
    n = 0
    while stop is None or stream.row < stop:
        raw = stream.next_line()
        if raw is None:
            break
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError(f"a JSON {type(obj).__name__}, not an object")
        except ValueError as exc:
            errors[n] = f"invalid json: {exc}"
            obj = {}
        for c in wanted:
            cols[c].append(obj.get(c))
        stream.row += 1
        n += 1
    block = RowBlock(
        source=info.source, start=start, columns={c: cols[c] for c in columns}, num_rows=n, errors=errors
    )
    for c in arrow_columns:
        try:
            block.arrow[c] = pa.array(cols[c])
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed types across records: keep each value as its JSON text.
            block.arrow[c] = pa.array([None if v is None else json.dumps(v) for v in cols[c]], pa.string())
    return block


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` serialised as one Parquet file in memory (snappy; no dictionary for floats)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="snappy", use_dictionary=False, write_statistics=False)
    return sink.getvalue()

"""Plan a job: list the input files, resolve the columns, cut files into units of work.

A *unit* is a row range of one file (about ``unit_rows`` rows, on Parquet row groups where it can),
keyed by the file's relative name and the range: the same input gives the same units on every host
and rerun, which makes resume and ``--num-shards`` deterministic.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec

from embedkit.errors import InputError
from embedkit.io.fs import get_fs, list_files
from embedkit.io.readers import EXTENSIONS, FileInfo, count_rows, describe_file, format_of

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("text", "texto", "caption", "sentence", "content")
# CSV / JSON Lines files up to this size are one unit each; larger ones are counted and split.
SPLIT_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Unit:
    """Rows ``[start, stop)`` of one input file (``stop=None``: to the end of the file)."""

    source: str
    start: int
    stop: int | None
    file: FileInfo = field(compare=False, hash=False, repr=False)
    error: str | None = None  # the whole unit is rejected with this reason (unreadable file...)

    @property
    def rows(self) -> int | None:
        return None if self.stop is None else self.stop - self.start

    @property
    def source_hash(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()[:10]

    @property
    def key(self) -> str:
        """Stable id of the unit: ``<hash of source>-<start>-<stop|end>``."""
        return f"{self.source_hash}-{self.start}-{'end' if self.stop is None else self.stop}"

    @property
    def part_name(self) -> str:
        """Output file name, derived from the unit so a rerun overwrites instead of duplicating."""
        stem = self.source.rsplit("/", 1)[-1]
        for ext in sorted(EXTENSIONS, key=len, reverse=True):
            if stem.lower().endswith(ext):
                stem = stem[: -len(ext)]
                break
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:40] or "file"
        return f"part-{stem}-{self.source_hash[:8]}-{self.start:010d}.parquet"


@dataclass
class Plan:
    """The resolved job: every unit (all hosts), the files, and the columns to read."""

    input: str
    units: list[Unit]
    files: list[FileInfo]
    text_column: str
    id_column: str | None  # None: ids are <file>:<row>
    keep_columns: tuple[str, ...]
    fs: fsspec.AbstractFileSystem

    @property
    def fingerprint_extra(self) -> dict[str, Any]:
        """What a modality adds to the job's fingerprint (nothing for text)."""
        return {}

    @property
    def metadata_extra(self) -> dict[str, Any]:
        """What a modality adds to ``metadata.json`` (nothing for text)."""
        return {}

    @property
    def known_rows(self) -> int:
        return sum(u.rows or 0 for u in self.units)

    def for_shard(self, num_shards: int, shard_index: int) -> list[Unit]:
        """This host's units: every ``num_shards``-th unit of the ordered plan, from ``shard_index``."""
        return [u for i, u in enumerate(self.units) if i % num_shards == shard_index]


def _missing(info: FileInfo, needed: list[str]) -> str | None:
    absent = [c for c in needed if c not in info.columns]
    if not absent:
        return None
    return f"missing column: {', '.join(map(repr, absent))} not in {info.source} (columns: {', '.join(info.columns)})"


def make_plan(
    input_url: str,
    *,
    text_column: str | None = None,
    id_column: str | None = None,
    keep_columns: tuple[str, ...] = (),
    unit_rows: int = 50_000,
    max_samples: int | None = None,
    fail_fast: bool = False,
    region: str | None = None,
) -> Plan:
    """List ``input_url`` and cut it into units. Fails before any work (``InputError``) when no file
    has the text column, naming the columns found."""
    fs, _ = get_fs(input_url, region)
    listed = list_files(input_url, EXTENSIONS, region)
    if not listed:
        raise InputError(
            f"no input files under {input_url} (looked for {', '.join(sorted(set(EXTENSIONS)))})"
        )
    infos = describe_files(fs, listed)
    readable = [i for i in infos if i.error is None]
    if fail_fast and len(readable) < len(infos):
        bad = next(i for i in infos if i.error is not None)
        raise InputError(f"{bad.source} cannot be read: {bad.error} (--fail-fast)", file=bad.source)
    if not readable:
        raise InputError(f"no input file under {input_url} can be read; first error: {infos[0].error}")
    text_col = _resolve_text_column(readable, text_column)
    id_col = _resolve_id_column(readable, id_column)
    needed = [text_col, *([id_col] if id_column else []), *keep_columns]
    first = readable[0]
    absent = [c for c in needed if c not in first.columns]
    if absent:
        raise InputError(
            f"{first.source} has no column {', '.join(map(repr, absent))}; columns found: "
            f"{', '.join(first.columns)}",
            file=first.source,
        )
    units: list[Unit] = []
    budget = max_samples
    for info in infos:
        if budget is not None and budget <= 0:
            break
        if info.error is not None:
            units.append(Unit(info.source, 0, None, info, error=f"unreadable: {info.error}"))
            continue
        problem = _missing(info, needed)
        if problem:
            if fail_fast:
                raise InputError(f"{problem} (--fail-fast)", file=info.source)
            units.append(Unit(info.source, 0, None, info, error=problem))
            continue
        if info.num_rows is None and (
            budget is not None or (info.size is not None and info.size > SPLIT_BYTES)
        ):
            log.info("counting rows of %s (%.0f MiB) to split it", info.source, (info.size or 0) / 2**20)
            if not count_or_reject(fs, info, units):
                continue
        budget = add_units(units, info, row_ranges(info, unit_rows), budget)
    if id_col is not None and id_column is None:
        lacking = [i.source for i in readable if id_col not in i.columns]
        if lacking:
            log.warning(
                "%d file(s) lack the %r column (e.g. %s): their ids are <file>:<row>",
                len(lacking),
                id_col,
                lacking[0],
            )
    return Plan(input_url, units, infos, text_col, id_col, tuple(keep_columns), fs)


def describe_files(fs: fsspec.AbstractFileSystem, listed: list[tuple[str, str]]) -> list[FileInfo]:
    """Read every file's footer / header, a few at a time (object stores answer in parallel)."""

    def one(item: tuple[str, str]) -> FileInfo:
        path, rel = item
        size = None
        if format_of(path) != "parquet":  # CSV / JSON Lines: the size decides whether to split
            try:
                size = int(fs.size(path))
            except Exception:
                size = None
        return describe_file(fs, path, rel, size=size)

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="embedkit-plan") as pool:
        return list(pool.map(one, listed))


def _resolve_text_column(infos: list[FileInfo], text_column: str | None) -> str:
    first = infos[0]
    if text_column:
        if not any(text_column in i.columns for i in infos):
            raise InputError(
                f"text column {text_column!r} is in no input file; columns found in {first.source}: "
                f"{', '.join(first.columns) or '(none)'}",
                field="text_column",
            )
        return text_column
    for name in TEXT_COLUMNS:
        if name in first.columns:
            return name
    raise InputError(
        f"no text column in {first.source}: looked for {', '.join(TEXT_COLUMNS)}; columns found: "
        f"{', '.join(first.columns) or '(none)'}; name one with --text-column",
        field="text_column",
    )


def _resolve_id_column(infos: list[FileInfo], id_column: str | None) -> str | None:
    if id_column:
        if id_column not in infos[0].columns:
            raise InputError(
                f"id column {id_column!r} is not in {infos[0].source}; columns found: "
                f"{', '.join(infos[0].columns)}",
                field="id_column",
            )
        return id_column
    return "key" if "key" in infos[0].columns else None


def count_or_reject(fs: fsspec.AbstractFileSystem, info: FileInfo, units: list[Unit]) -> bool:
    """Count ``info``'s rows (sets ``info.num_rows``); a file that cannot be read becomes a unit
    carrying the error instead, and False is returned."""
    try:
        count_rows(fs, info)
    except Exception as exc:
        units.append(Unit(info.source, 0, None, info, error=f"unreadable: {type(exc).__name__}: {exc}"))
        return False
    return True


def add_units(
    units: list[Unit], info: FileInfo, spans: list[tuple[int, int | None]], budget: int | None
) -> int | None:
    """Append a unit per row range of ``info`` to ``units``, cutting them to ``budget`` rows in all
    (``--max-samples``; None: no limit). Returns the budget left."""
    for start, stop in spans:
        if budget is not None:
            stop = start + budget if stop is None else min(stop, start + budget)
            budget -= stop - start
        units.append(Unit(info.source, start, stop, info))
        if budget is not None and budget <= 0:
            break
    return budget


def row_ranges(info: FileInfo, unit_rows: int) -> list[tuple[int, int | None]]:
    """Row ranges of about ``unit_rows`` rows, on Parquet row-group boundaries where possible.

    >>> info = FileInfo("p", "a.parquet", "parquet", num_rows=250, row_groups=[100, 100, 50])
    >>> row_ranges(info, 150)
    [(0, 200), (200, 250)]
    >>> row_ranges(FileInfo("p", "b.parquet", "parquet", num_rows=400, row_groups=[400]), 100)
    [(0, 100), (100, 200), (200, 300), (300, 400)]
    """
    if info.num_rows is None:
        return [(0, None)]
    if info.num_rows == 0:
        return [(0, 0)]
    groups = info.row_groups or [info.num_rows]
    if not info.row_groups:  # CSV / JSON Lines: plain row ranges
        groups = [unit_rows] * (info.num_rows // unit_rows) + [info.num_rows % unit_rows]
    bounds = [0]
    offset = 0
    for n in groups:
        g0, g1 = offset, offset + n
        offset = g1
        if n > 2 * unit_rows:  # a huge row group is cut inside
            if bounds[-1] < g0:
                bounds.append(g0)
            bounds.extend(range(g0 + unit_rows, g1, unit_rows))
            bounds.append(g1)
        elif g1 - bounds[-1] >= unit_rows:
            bounds.append(g1)
    if bounds[-1] < info.num_rows:
        bounds.append(info.num_rows)
    return list(itertools.pairwise(bounds))

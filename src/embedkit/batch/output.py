"""The job's output folder: part files (``id``, ``embedding``, with ``--outputs`` BGE-M3's
``sparse_indices`` / ``sparse_values`` / ``colbert``), rejects, the optional single-file merge (their
columns: docs/batch-jobs.md). Files are written whole (:func:`embedkit.io.fs.write_bytes`) under
names derived from the unit, so a rerun overwrites.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedkit.errors import StorageError
from embedkit.io.fs import TMP_PREFIX, is_remote_fs, join_fs, list_names, older_than, remove, write_bytes
from embedkit.io.readers import parquet_bytes

log = logging.getLogger(__name__)

REJECTS_DIR = "rejects"
MERGED_NAME = "embeddings.parquet"
REJECTS_SCHEMA = pa.schema(
    [("source", pa.string()), ("row", pa.int64()), ("id", pa.string()), ("reason", pa.string())]
)
_ARROW_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def embeddings_table(
    ids: list[str],
    outputs: Mapping[str, Any],
    dtype: str = "float32",
    extra: dict[str, pa.Array] | None = None,
) -> pa.Table:
    """``id`` + the columns of ``outputs`` (readable by pandas, polars, pyarrow and DuckDB), rows
    aligned with ``ids``: ``dense`` (an (n, dim) array) as ``embedding``, a fixed-size list;
    ``sparse`` ((token ids, weights) pairs) as ``sparse_indices`` (list<int32>) and
    ``sparse_values`` (list<float32>); ``colbert`` ((tokens - 1, dim) arrays) as ``colbert``, a
    list of fixed-size lists. ``dtype`` is that of the vectors (embedding, colbert).

    >>> t = embeddings_table(["a", "b"], {"dense": np.ones((2, 3), np.float32)})
    >>> str(t.schema.field("embedding").type)
    'fixed_size_list<item: float>[3]'
    """
    cols: dict[str, pa.Array] = {"id": pa.array(ids, pa.string())}
    if outputs.get("dense") is not None:
        cols["embedding"] = vector_array(outputs["dense"], dtype)
    if outputs.get("sparse") is not None:
        pairs = outputs["sparse"]
        offsets = pa.array(_offsets([len(i) for i, _ in pairs]), pa.int32())
        cols["sparse_indices"] = pa.ListArray.from_arrays(
            offsets, pa.array(_concat([i for i, _ in pairs], np.int32), pa.int32())
        )
        cols["sparse_values"] = pa.ListArray.from_arrays(
            offsets, pa.array(_concat([w for _, w in pairs], np.float32), pa.float32())
        )
    if outputs.get("colbert") is not None:
        mats = outputs["colbert"]
        dim = mats[0].shape[1] if mats else 0
        flat = np.concatenate(mats) if mats else np.empty((0, dim), np.float32)
        offsets = pa.array(_offsets([len(m) for m in mats]), pa.int32())
        cols["colbert"] = pa.ListArray.from_arrays(offsets, vector_array(flat, dtype))
    for name, arr in (extra or {}).items():
        cols[name] = arr
    return pa.table(cols)


def vector_array(vectors: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    """An (n, dim) array as n fixed-size lists of ``dtype``."""
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.dtype(dtype)).reshape(-1), _ARROW_DTYPES[dtype])
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def _offsets(lengths: list[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _concat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.empty(0, dtype)


def rejects_table(rows: list[tuple[str, int | None, str | None, str]]) -> pa.Table:
    """Rejects as a table: ``(source, row, id, reason)`` tuples."""
    cols = list(zip(*rows, strict=True)) if rows else [[], [], [], []]
    return pa.Table.from_arrays(
        [pa.array(c, f.type) for c, f in zip(cols, REJECTS_SCHEMA, strict=True)], schema=REJECTS_SCHEMA
    )


class OutputFolder:
    """Paths and writes inside the output root (a path of ``fs``)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root
        self.rejects_dir = join_fs(fs, root, REJECTS_DIR)
        self._existing: set[str] = set()

    def path(self, name: str) -> str:
        return join_fs(self.fs, self.root, name)

    def rejects_path(self, name: str) -> str:
        return join_fs(self.fs, self.rejects_dir, name)

    def scan(self) -> set[str]:
        """Existing part and rejects files (``rejects/`` prefixed), remembered for :meth:`write_unit`."""
        names, rejected = list_names(self.fs, self.root), list_names(self.fs, self.rejects_dir)
        parts = {n for n in names if n.startswith("part-") and n.endswith(".parquet")}
        rejects = {f"{REJECTS_DIR}/{n}" for n in rejected if n.startswith("part-")}
        self._existing = parts | rejects
        return set(self._existing)

    def part_names(self) -> list[str]:
        return sorted(n for n in self.scan() if not n.startswith(REJECTS_DIR + "/"))

    def remove_stale(self, plan_parts: set[str], *, all_temp: bool) -> int:
        """Delete part/rejects files no unit of the plan writes, and leftovers of killed runs."""
        n = 0
        for name in sorted(self.scan()):
            base = name.split("/", 1)[-1]
            if base not in plan_parts and remove(self.fs, self.path(name)):
                n += 1
                self._existing.discard(name)
        for folder in (self.root, self.rejects_dir):
            for name in list_names(self.fs, folder):
                if name.startswith(TMP_PREFIX) and (
                    all_temp or older_than(self.fs, join_fs(self.fs, folder, name))
                ):
                    n += remove(self.fs, join_fs(self.fs, folder, name))
        return n

    def write_unit(self, part_name: str, table: pa.Table | None, rejects: pa.Table | None) -> None:
        """Write a unit's rejects then its part (each whole); remove a counterpart an earlier run
        of the unit left that this run does not produce."""
        rej_name = f"{REJECTS_DIR}/{part_name}"
        if rejects is not None and rejects.num_rows:
            write_bytes(self.fs, self.rejects_path(part_name), parquet_bytes(rejects))
        elif rej_name in self._existing:
            remove(self.fs, self.rejects_path(part_name))
        if table is not None and table.num_rows:
            write_bytes(self.fs, self.path(part_name), parquet_bytes(table))
        elif part_name in self._existing:
            remove(self.fs, self.path(part_name))

    def merge(self, part_names: list[str], dest: str = MERGED_NAME) -> int:
        """Stream ``part_names`` (in order) into one Parquet file ``dest``, whole or not at all.
        Returns the number of rows written."""
        if not part_names:
            return 0
        schemas = [pq.read_schema(self.fs.open(self.path(n), "rb")) for n in part_names]
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        target = self.path(dest)
        rows = 0
        try:
            if is_remote_fs(self.fs):
                handle = self.fs.open(target, "wb")  # a multipart upload: visible only once complete
                tmp = None
            else:
                tmp = join_fs(self.fs, self.root, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{dest}")
                handle = open(tmp, "wb")  # noqa: SIM115 - closed by the with below
            with (
                handle,
                pq.ParquetWriter(handle, schema, compression="snappy", use_dictionary=False) as writer,
            ):
                for name in part_names:
                    with self.fs.open(self.path(name), "rb") as fh:
                        for batch in pq.ParquetFile(fh).iter_batches(batch_size=65536):
                            tbl = pa.Table.from_batches([batch])
                            writer.write_table(tbl.cast(schema) if tbl.schema != schema else tbl)
                            rows += batch.num_rows
            if tmp is not None:
                os.replace(tmp, target)
        except Exception as exc:
            raise StorageError(f"cannot merge the parts into {target}: {exc}") from exc
        return rows

"""Read a job's output back, and export it as ``.npy`` files or a FAISS index.

``embedkit export OUTPUT --format npy`` writes ``OUTPUT/export/embeddings.npy`` (float32, one row per
vector), ``ids.npy`` (unicode strings, no pickle needed) and ``export.json`` (count, dimension,
metric, model, and the part files in row order). ``--format faiss`` writes ``index.faiss`` beside
them (``faiss-cpu``, the ``embedkit[faiss]`` extra). A job made with ``--outputs`` sparse or colbert
(BGE-M3) also exports ``sparse.npz``, the lexical weights as a CSR matrix of shape (rows, vocabulary
size) in the layout ``scipy.sparse.save_npz`` writes (``scipy.sparse.load_npz`` reads it; written
with numpy, scipy is not needed), and ``colbert.npy``, every row's ColBERT vectors stacked, with
``colbert_offsets.npy`` (int64, rows + 1 entries: row ``i``'s vectors are
``colbert[offsets[i]:offsets[i + 1]]``).

>>> from embedkit.batch.export import export_output
>>> export_output("out/", fmt="faiss")     # doctest: +SKIP
{'count': 600, 'dimension': 384, 'metric': 'ip', ...}
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedkit.batch.output import MERGED_NAME
from embedkit.batch.settings import OUTPUT_COLUMNS
from embedkit.engine.multi import OUTPUTS
from embedkit.errors import ConfigError, InputError, StorageError
from embedkit.io.fs import get_fs, is_remote, join, join_fs, read_json, write_json

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
FORMATS = ("npy", "faiss")


def import_faiss():
    """The ``faiss`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise ConfigError(
            "the FAISS format needs faiss-cpu: pip install 'embedkit[faiss]' (or faiss-cpu); "
            "--format npy works without it"
        ) from None
    return faiss


class JobOutput:
    """A finished (or partial) job output folder, local or ``s3://``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = get_fs(url)
        self.metadata = read_json(self.fs, join_fs(self.fs, self.root, "metadata.json"))
        if self.metadata is None:
            state = read_json(self.fs, join_fs(self.fs, self.root, "_state", "job.json"))
            if state is None:
                raise InputError(f"{url} holds no embedkit job output (no metadata.json, no _state/job.json)")
            log.warning(
                "%s has no metadata.json: the job is not complete, using the parts written so far", url
            )
        self.files = self._files()
        self._columns: list[str] | None = None

    def _files(self) -> list[str]:
        self.fs.invalidate_cache(self.root)
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            raise InputError(f"{self.url} does not exist") from None
        parts = sorted(n for n in names if n.startswith("part-") and n.endswith(".parquet"))
        if not parts and MERGED_NAME in names:
            parts = [MERGED_NAME]
        if not parts:
            raise InputError(
                f"{self.url} holds no part-*.parquet nor {MERGED_NAME}: nothing was embedded yet"
            )
        return parts

    def path(self, name: str) -> str:
        return join_fs(self.fs, self.root, name)

    @property
    def normalize(self) -> bool:
        return bool((self.metadata or {}).get("normalize", True))

    @property
    def metric(self) -> str:
        """``ip`` (inner product = cosine on normalised vectors) or ``l2``."""
        return "ip" if self.normalize else "l2"

    @property
    def columns(self) -> list[str]:
        """The part files' columns (every part of a job has the same)."""
        if self._columns is None:
            with self.fs.open(self.path(self.files[0]), "rb") as fh:
                self._columns = list(pq.read_schema(fh).names)
        return self._columns

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs the parts hold (dense, sparse, colbert), from their columns."""
        return tuple(o for o in OUTPUTS if all(c in self.columns for c in OUTPUT_COLUMNS[o]))

    def require(self, outputs: tuple[str, ...], purpose: str) -> None:
        """Raise :class:`ConfigError` when the parts lack one of ``outputs`` (needed for ``purpose``)."""
        missing = [o for o in outputs if o not in self.outputs]
        if missing:
            cols = ", ".join(c for o in missing for c in OUTPUT_COLUMNS[o])
            raise ConfigError(
                f"{purpose} needs the {', '.join(missing)} output ({cols} column), which {self.url} does "
                f"not hold (its parts hold {', '.join(self.outputs) or 'no output'}); embed the dataset "
                f"again with --outputs {','.join(o for o in OUTPUTS if o in {*self.outputs, *missing})}"
            )

    def counts(self) -> list[int]:
        out = []
        for name in self.files:
            with self.fs.open(self.path(name), "rb") as fh:
                out.append(pq.ParquetFile(fh).metadata.num_rows)
        return out

    def iter_tables(self, columns: tuple[str, ...]) -> Iterator[pa.Table]:
        """Each part file's ``columns`` (those it has), in order; memory bounded by a part."""
        for name in self.files:
            with self.fs.open(self.path(name), "rb") as fh:
                pf = pq.ParquetFile(fh)
                avail = pf.schema_arrow.names
                yield pf.read(columns=[c for c in dict.fromkeys(columns) if c in avail])

    def iter_parts(
        self, columns: tuple[str, ...] = ("id", "embedding")
    ) -> Iterator[tuple[list[str], np.ndarray, dict]]:
        """``(ids, float32 vectors, other columns)`` per part file, in order; memory bounded by a part."""
        for table in self.iter_tables(("id", "embedding", *columns)):
            extra = {
                c: table.column(c).to_pylist() for c in table.column_names if c not in ("id", "embedding")
            }
            yield table.column("id").to_pylist(), dense_matrix(table), extra


# ------------------------------------------------------------------ the output columns as arrays
def dense_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as an (n, dim) float32 array."""
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    return emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, pa.Array]:
    """A list column's offsets (int64, n + 1 entries from 0) and its values."""
    arr = table.column(name).combine_chunks()
    offsets = np.asarray(arr.offsets, np.int64)
    return offsets - offsets[0], arr.flatten()


def sparse_rows(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(offsets, token ids int32, weights float32)`` of the sparse columns: row ``i``'s lexical
    weights are ``ids[offsets[i]:offsets[i + 1]]`` and the same slice of the weights."""
    offsets, ids = _list_column(table, "sparse_indices")
    _, weights = _list_column(table, "sparse_values")
    return (
        offsets,
        ids.to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
        weights.to_numpy(zero_copy_only=False).astype(np.float32, copy=False),
    )


def colbert_rows(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, vectors)`` of the ``colbert`` column: row ``i``'s vectors are
    ``vectors[offsets[i]:offsets[i + 1]]`` (float32, or float16 as the job stored them)."""
    offsets, vecs = _list_column(table, "colbert")
    dim = vecs.type.list_size
    return offsets, vecs.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


class NpyStream:
    """A ``.npy`` file written in chunks along its first axis, its length unknown until the end: the
    header is written for length 0, then rewritten in place by :meth:`close` (numpy pads headers so
    that the first axis can grow without moving the data)."""

    def __init__(self, path: str, dtype: Any, tail: tuple[int, ...] = ()) -> None:
        self.path, self.dtype, self.tail, self.rows = path, np.dtype(dtype), tuple(tail), 0
        self.fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.header = self._header(0)
        self.fh.write(self.header)

    def _header(self, rows: int) -> bytes:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf,
            {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": (rows, *self.tail),
            },
        )
        return buf.getvalue()

    def write(self, chunk: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(chunk, dtype=self.dtype).reshape(-1, *self.tail).tobytes())
        self.rows += len(chunk)

    def close(self) -> None:
        header = self._header(self.rows)
        if len(header) != len(self.header):  # never with numpy's padding; refuse rather than corrupt
            raise StorageError(f"cannot finish {self.path}: the .npy header grew")
        self.fh.seek(0)
        self.fh.write(header)
        self.fh.close()


def export_output(
    url: str, *, fmt: str = "npy", dest: str | None = None, factory: str = "Flat"
) -> dict[str, Any]:
    """Export the outputs and ids of the job output ``url`` to ``dest`` (default ``url/export``):
    every output the parts hold (dense: ``embeddings.npy``; sparse: ``sparse.npz``; ColBERT:
    ``colbert.npy`` and ``colbert_offsets.npy``).

    ``fmt="faiss"`` also builds a FAISS index of the dense vectors (``factory``: a
    ``faiss.index_factory`` string, e.g. ``Flat`` (exact) or ``IVF1024,Flat``; trained on the first
    100k vectors when it needs training)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = JobOutput(url)
    outputs = out.outputs
    if fmt == "faiss":
        out.require(("dense",), "--format faiss")
    faiss = import_faiss() if fmt == "faiss" else None
    dest = dest or join(url, EXPORT_DIR)
    counts = out.counts()
    total = sum(counts)
    meta = out.metadata or {}
    columns = ("id", *(c for o in outputs for c in OUTPUT_COLUMNS[o]))
    with tempfile.TemporaryDirectory(prefix="embedkit-export-") as tmp:
        vec_path = os.path.join(tmp, "embeddings.npy")
        ids: list[str] = []
        vectors = None
        sparse = _SparseExport(tmp) if "sparse" in outputs else None
        colbert = _ColbertExport(tmp, total) if "colbert" in outputs else None
        row = 0
        for table in out.iter_tables(columns):
            n = table.num_rows
            if "dense" in outputs:
                vecs = dense_matrix(table)
                if vectors is None:
                    vectors = np.lib.format.open_memmap(
                        vec_path, mode="w+", dtype=np.float32, shape=(total, vecs.shape[1])
                    )
                vectors[row : row + n] = vecs
            if sparse is not None:
                sparse.add(*sparse_rows(table))
            if colbert is not None:
                colbert.add(*colbert_rows(table))
            row += n
            ids.extend(table.column("id").to_pylist())
        np.save(os.path.join(tmp, "ids.npy"), np.array(ids, dtype=str), allow_pickle=False)
        info: dict[str, Any] = {
            "count": total,
            "outputs": list(outputs),
            "dimension": int(vectors.shape[1]) if vectors is not None else None,
            "metric": out.metric,
            "normalize": out.normalize,
            "model": meta.get("model"),
            "parts": [{"file": f, "rows": n} for f, n in zip(out.files, counts, strict=True)],
            "files": ["ids.npy"],
        }
        if vectors is not None:
            vectors.flush()
            info["files"].insert(0, "embeddings.npy")
        if sparse is not None:
            info.update(sparse.finish(total, meta.get("vocab_size")))
            info["files"].append("sparse.npz")
        if colbert is not None:
            info.update(colbert.finish())
            info["files"] += ["colbert.npy", "colbert_offsets.npy"]
        if faiss is not None:
            assert vectors is not None
            dim = int(vectors.shape[1])
            metric = faiss.METRIC_INNER_PRODUCT if out.metric == "ip" else faiss.METRIC_L2
            index = faiss.index_factory(dim, factory, metric)
            if not index.is_trained:
                index.train(np.ascontiguousarray(vectors[: min(total, 100_000)]))
            for start in range(0, total, 65536):
                index.add(np.ascontiguousarray(vectors[start : start + 65536]))
            faiss.write_index(index, os.path.join(tmp, "index.faiss"))
            info["files"].append("index.faiss")
            info["faiss_factory"] = factory
        del vectors
        _publish(tmp, dest, info)
    info["dest"] = dest
    return info


class _SparseExport:
    """The sparse columns streamed into ``sparse.npz``: CSR ``data``, ``indices`` and ``indptr``, with
    each row's token ids sorted (the canonical CSR form), plus ``shape`` and ``format``."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.data = NpyStream(os.path.join(tmp, "data.npy"), np.float32)
        self.indices = NpyStream(os.path.join(tmp, "indices.npy"), np.int32)
        self.indptr: list[np.ndarray] = [np.zeros(1, np.int64)]
        self.max_id = -1

    def add(self, offsets: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
        rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        order = np.lexsort((ids, rows))
        self.indices.write(ids[order])
        self.data.write(weights[order])
        self.indptr.append(offsets[1:] + self.indptr[-1][-1])
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))

    def finish(self, rows: int, vocab_size: int | None) -> dict[str, Any]:
        self.data.close()
        self.indices.close()
        if vocab_size is None:
            vocab_size = self.max_id + 1
            log.warning(
                "metadata.json records no vocab_size: sparse.npz has %d columns (the largest token id + 1)",
                vocab_size,
            )
        np.save(os.path.join(self.tmp, "indptr.npy"), np.concatenate(self.indptr), allow_pickle=False)
        np.save(os.path.join(self.tmp, "shape.npy"), np.array([rows, vocab_size], np.int64))
        np.save(os.path.join(self.tmp, "format.npy"), np.array(b"csr"), allow_pickle=False)
        with zipfile.ZipFile(
            os.path.join(self.tmp, "sparse.npz"), "w", zipfile.ZIP_STORED, allowZip64=True
        ) as z:
            for key in ("indices", "indptr", "format", "shape", "data"):  # scipy.sparse.save_npz's keys
                path = os.path.join(self.tmp, f"{key}.npy")
                z.write(path, arcname=f"{key}.npy")
                os.remove(path)
        return {"vocab_size": int(vocab_size), "sparse_nnz": int(self.indices.rows)}


class _ColbertExport:
    """The ``colbert`` column streamed into ``colbert.npy`` (the parts' dtype) and its offsets."""

    def __init__(self, tmp: str, rows: int) -> None:
        self.tmp = tmp
        self.vectors: NpyStream | None = None
        self.offsets = np.zeros(rows + 1, np.int64)
        self.row = 0

    def add(self, offsets: np.ndarray, vecs: np.ndarray) -> None:
        if self.vectors is None:
            self.vectors = NpyStream(os.path.join(self.tmp, "colbert.npy"), vecs.dtype, vecs.shape[1:])
        n = len(offsets) - 1
        self.offsets[self.row + 1 : self.row + n + 1] = offsets[1:] + self.offsets[self.row]
        self.vectors.write(vecs)
        self.row += n

    def finish(self) -> dict[str, Any]:
        assert self.vectors is not None
        self.vectors.close()
        np.save(os.path.join(self.tmp, "colbert_offsets.npy"), self.offsets, allow_pickle=False)
        return {
            "colbert_dimension": int(self.vectors.tail[0]),
            "colbert_vectors": int(self.vectors.rows),
            "colbert_dtype": str(self.vectors.dtype),
        }


def _publish(tmp: str, dest: str, info: dict[str, Any]) -> None:
    fs, root = get_fs(dest)
    try:
        if not is_remote(dest):
            os.makedirs(root, exist_ok=True)
            for name in info["files"]:
                os.replace(os.path.join(tmp, name), os.path.join(root, name))
        else:
            for name in info["files"]:
                fs.put_file(os.path.join(tmp, name), join_fs(fs, root, name))
    except OSError as exc:
        raise StorageError(f"cannot write the export to {dest}: {exc}") from exc
    write_json(fs, join_fs(fs, root, "export.json"), info)


def load_export(url: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray] | None:
    """``(export.json, ids, dense vectors)`` from ``url/export`` if present (with dense vectors),
    else None."""
    fs, root = get_fs(url)
    base = join_fs(fs, root, EXPORT_DIR)
    info = read_json(fs, join_fs(fs, base, "export.json"))
    if info is None or "embeddings.npy" not in info.get("files", []):
        return None
    with fs.open(join_fs(fs, base, "ids.npy"), "rb") as fh:
        ids = np.load(fh, allow_pickle=False)
    with fs.open(join_fs(fs, base, "embeddings.npy"), "rb") as fh:
        vecs = np.load(fh, allow_pickle=False)
    return info, ids, vecs


def dumps(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, default=str)

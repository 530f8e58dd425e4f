"""Read a job's output back, and export it as ``.npy`` files or a FAISS index.

``embedkit export OUTPUT --format npy`` writes ``OUTPUT/export/embeddings.npy`` (float32, one row per
vector), ``ids.npy`` (unicode strings, no pickle needed) and ``export.json`` (count, dimension,
metric, model, and the part files in row order). ``--format faiss`` writes ``index.faiss`` beside
them (``faiss-cpu``, the ``embedkit[faiss]`` extra).

>>> from embedkit.batch.export import export_output
>>> export_output("out/", fmt="faiss")     # doctest: +SKIP
{'count': 600, 'dimension': 384, 'metric': 'ip', ...}
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from embedkit.batch.output import MERGED_NAME
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

    def counts(self) -> list[int]:
        out = []
        for name in self.files:
            with self.fs.open(self.path(name), "rb") as fh:
                out.append(pq.ParquetFile(fh).metadata.num_rows)
        return out

    def iter_parts(
        self, columns: tuple[str, ...] = ("id", "embedding")
    ) -> Iterator[tuple[list[str], np.ndarray, dict]]:
        """``(ids, float32 vectors, other columns)`` per part file, in order; memory bounded by a part."""
        for name in self.files:
            with self.fs.open(self.path(name), "rb") as fh:
                pf = pq.ParquetFile(fh)
                avail = pf.schema_arrow.names
                table = pf.read(columns=[c for c in columns if c in avail])
            emb = table.column("embedding").combine_chunks()
            dim = emb.type.list_size
            vecs = (
                emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
            )
            extra = {
                c: table.column(c).to_pylist() for c in columns if c in avail and c not in ("id", "embedding")
            }
            yield table.column("id").to_pylist(), vecs, extra


def export_output(
    url: str, *, fmt: str = "npy", dest: str | None = None, factory: str = "Flat"
) -> dict[str, Any]:
    """Export the vectors and ids of the job output ``url`` to ``dest`` (default ``url/export``).

    ``fmt="faiss"`` also builds a FAISS index (``factory``: a ``faiss.index_factory`` string, e.g.
    ``Flat`` (exact) or ``IVF1024,Flat``; trained on the first 100k vectors when it needs training)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    faiss = import_faiss() if fmt == "faiss" else None
    out = JobOutput(url)
    dest = dest or join(url, EXPORT_DIR)
    counts = out.counts()
    total = sum(counts)
    with tempfile.TemporaryDirectory(prefix="embedkit-export-") as tmp:
        vec_path = os.path.join(tmp, "embeddings.npy")
        ids: list[str] = []
        vectors = None
        row = 0
        for part_ids, vecs, _ in out.iter_parts():
            if vectors is None:
                vectors = np.lib.format.open_memmap(
                    vec_path, mode="w+", dtype=np.float32, shape=(total, vecs.shape[1])
                )
            vectors[row : row + len(vecs)] = vecs
            row += len(vecs)
            ids.extend(part_ids)
        assert vectors is not None
        vectors.flush()
        dim = int(vectors.shape[1])
        np.save(os.path.join(tmp, "ids.npy"), np.array(ids, dtype=str), allow_pickle=False)
        info: dict[str, Any] = {
            "count": total,
            "dimension": dim,
            "metric": out.metric,
            "normalize": out.normalize,
            "model": (out.metadata or {}).get("model"),
            "parts": [{"file": f, "rows": n} for f, n in zip(out.files, counts, strict=True)],
            "files": ["embeddings.npy", "ids.npy"],
        }
        if faiss is not None:
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
    """``(export.json, ids, vectors)`` from ``url/export`` if present, else None."""
    fs, root = get_fs(url)
    base = join_fs(fs, root, EXPORT_DIR)
    info = read_json(fs, join_fs(fs, base, "export.json"))
    if info is None:
        return None
    with fs.open(join_fs(fs, base, "ids.npy"), "rb") as fh:
        ids = np.load(fh, allow_pickle=False)
    with fs.open(join_fs(fs, base, "embeddings.npy"), "rb") as fh:
        vecs = np.load(fh, allow_pickle=False)
    return info, ids, vecs


def dumps(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, default=str)

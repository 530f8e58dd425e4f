"""Helpers shared by the batch job tests: build small datasets, read a job's output back."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedkit.io.fs import get_fs

WORDS = "the cat sat on a mat dog runs in park red blue green house car tree water sun moon book".split()


def sentence(i: int, n_words: int | None = None) -> str:
    n = n_words or 3 + (i * 7) % 9
    return " ".join(WORDS[(i * 3 + j * 5) % len(WORDS)] for j in range(n)) + f" {i}"


def write_parquet_dataset(
    url: str, files: int = 3, rows: int = 120, *, column: str = "text", row_group_size: int = 40
) -> list[str]:
    """``files`` Parquet files of ``rows`` texts each (columns ``key``-less: text + n); returns texts."""
    fs, root = get_fs(url)
    texts: list[str] = []
    for f in range(files):
        chunk = [sentence(f * rows + i) for i in range(rows)]
        texts.extend(chunk)
        table = pa.table({column: chunk, "n": list(range(f * rows, (f + 1) * rows))})
        path = f"{root.rstrip('/')}/shard-{f:02d}.parquet"
        if "://" not in url:
            os.makedirs(root, exist_ok=True)
        with fs.open(path, "wb") as fh:
            pq.write_table(table, fh, row_group_size=row_group_size)
    return texts


@contextmanager
def local_ray() -> Iterator[str]:
    """A local Ray (2 CPUs, no GPU, 128 MiB of object store, quiet) while in the block; yields its
    address for ``--ray-address``. The caller has checked that ray imports (``pytest.importorskip``)."""
    import ray

    ctx = ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,
        object_store_memory=128 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


def read_parts(url: str) -> tuple[list[str], np.ndarray, list[str]]:
    """``(ids, vectors, part file names)`` of a job output, sorted by id."""
    fs, root = get_fs(url)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    parts = [n for n in names if n.startswith("part-") and n.endswith(".parquet")]
    if not parts and "embeddings.parquet" in names:
        parts = ["embeddings.parquet"]
    ids: list[str] = []
    vecs: list[np.ndarray] = []
    for n in parts:
        with fs.open(f"{root.rstrip('/')}/{n}", "rb") as fh:
            t = pq.read_table(fh)
        ids.extend(t.column("id").to_pylist())
        emb = t.column("embedding").combine_chunks()
        vecs.append(emb.flatten().to_numpy().astype(np.float32).reshape(len(t), emb.type.list_size))
    order = np.argsort(np.array(ids, dtype=object), kind="stable") if ids else np.zeros(0, int)
    allv = np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)
    return [ids[i] for i in order], allv[order], parts


def read_rejects(url: str) -> list[dict]:
    fs, root = get_fs(url)
    fs.invalidate_cache()
    folder = f"{root.rstrip('/')}/rejects"
    try:
        names = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        return []
    rows: list[dict] = []
    for p in names:
        with fs.open(p, "rb") as fh:
            rows.extend(pq.read_table(fh).to_pylist())
    return rows


def read_metadata(url: str, name: str = "metadata.json") -> dict | None:
    fs, root = get_fs(url)
    fs.invalidate_cache()
    try:
        with fs.open(f"{root.rstrip('/')}/{name}", "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None


def count_markers(url: str) -> int:
    fs, root = get_fs(url)
    folder = f"{root.rstrip('/')}/_state/units"
    fs.invalidate_cache(folder)
    try:
        return sum(
            1 for p in fs.ls(folder, detail=False) if p.endswith(".json") and "/.embedkit-tmp-" not in p
        )
    except FileNotFoundError:
        return 0

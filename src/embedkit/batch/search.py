"""Top-k search over a job's output: the FAISS index or ``.npy`` export when there is one, else a
streaming scan of the part files (memory bounded by a part). Queries are embedded with the model and
settings recorded in ``metadata.json``, so query and corpus vectors match.

>>> from embedkit.batch.search import search_output
>>> hits = search_output("out/", ["how do I catch an error"], k=3)     # doctest: +SKIP
>>> hits[0][0].id, round(hits[0][0].score, 3)                          # doctest: +SKIP
('doc-00042', 0.712)
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from embedkit.batch.export import EXPORT_DIR, JobOutput, load_export
from embedkit.errors import DeviceError, ModelNotFoundError
from embedkit.io.fs import join_fs

log = logging.getLogger(__name__)


@dataclass
class Hit:
    rank: int
    id: str
    score: float  # inner product (cosine for normalised vectors); for l2 outputs, the squared distance
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def query_embedder(
    meta: dict[str, Any], model: str | None = None, prompt_name: str | None = None, device: str = "auto"
):
    """An :class:`~embedkit.Embedder` matching the one that made the vectors (``meta`` = metadata.json)."""
    from embedkit import Embedder

    m = meta.get("model") or {}
    specs = [model] if model else [s for s in (m.get("spec"), m.get("path"), "default") if s]
    last: Exception | None = None
    for spec in dict.fromkeys(specs):
        for precision in dict.fromkeys((meta.get("precision") or "fp32", "fp32")):
            try:
                emb = Embedder(
                    spec,
                    device=device,
                    precision=precision,
                    normalize=meta.get("normalize"),
                    dimensions=meta.get("dimension"),
                    pooling=m.get("pooling"),
                    prompt_name=prompt_name,
                )
            except DeviceError as exc:
                last = exc
                continue
            except ModelNotFoundError as exc:
                last = exc
                break
            if m.get("content_hash") and emb.content_hash != m["content_hash"]:
                log.warning(
                    "the query model %s is not the one that made the vectors (content hash differs)", spec
                )
            return emb
    raise last or ModelNotFoundError("no model to embed the query with; pass --model")


def search_output(
    url: str,
    queries: list[str],
    *,
    k: int = 5,
    embedder: Any = None,
    model: str | None = None,
    prompt_name: str | None = None,
) -> list[list[Hit]]:
    """The ``k`` nearest vectors of ``url`` to each query, best first."""
    out = JobOutput(url)
    meta = out.metadata or {}
    emb = embedder or query_embedder(meta, model, prompt_name)
    q = np.asarray(emb.encode(list(queries)), dtype=np.float32)
    text_col = (
        meta.get("text_column") if meta.get("text_column") in (meta.get("keep_columns") or []) else None
    )
    exported = load_export(url)
    if exported is not None:
        info, ids, vecs = exported
        scores, idx = _faiss_search(out, info, q, k)
        if scores is None:
            scores, idx = _topk(q, vecs, k, out.metric)
        texts = _texts_at(out, info, idx, text_col) if text_col else {}
        return [
            [
                Hit(r + 1, str(ids[i]), float(s), texts.get(int(i)))
                for r, (i, s) in enumerate(zip(row_i, row_s, strict=True))
                if i >= 0
            ]
            for row_i, row_s in zip(idx, scores, strict=True)
        ]
    return _scan(out, q, k, text_col)


def _faiss_search(out: JobOutput, info: dict, q: np.ndarray, k: int):
    if "index.faiss" not in info.get("files", []):
        return None, None
    try:
        import faiss
    except ImportError:
        log.info("faiss not installed: searching the .npy export with numpy")
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "index.faiss")
        out.fs.get_file(join_fs(out.fs, out.root, EXPORT_DIR, "index.faiss"), local)
        index = faiss.read_index(local)
    scores, idx = index.search(np.ascontiguousarray(q), k)
    return scores, idx


def _topk(q: np.ndarray, vecs: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (higher first) or squared L2 distance (lower first)."""
    if metric == "ip":
        s = q @ vecs.T
    else:
        s = -((q * q).sum(1)[:, None] - 2 * q @ vecs.T + (vecs * vecs).sum(1)[None, :])
    k = min(k, s.shape[1])
    idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(s, idx, 1)
    order = np.argsort(-part, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, 1)
    best = np.take_along_axis(s, idx, 1)
    return (best if metric == "ip" else -best), idx


def _scan(out: JobOutput, q: np.ndarray, k: int, text_col: str | None) -> list[list[Hit]]:
    """Stream the parts, keeping each query's best ``k``."""
    best: list[list[tuple[float, str, str | None]]] = [[] for _ in range(len(q))]
    cols = ("id", "embedding", *((text_col,) if text_col else ()))
    for ids, vecs, extra in out.iter_parts(cols):
        scores, idx = _topk(q, vecs, k, out.metric)
        for qi in range(len(q)):
            cand = best[qi] + [
                (float(s), ids[i], extra[text_col][i] if text_col else None)
                for i, s in zip(idx[qi], scores[qi], strict=True)
            ]
            cand.sort(key=lambda c: -c[0] if out.metric == "ip" else c[0])
            best[qi] = cand[:k]
    return [[Hit(r + 1, i, s, t) for r, (s, i, t) in enumerate(row)] for row in best]


def _texts_at(out: JobOutput, info: dict, idx: np.ndarray, text_col: str) -> dict[int, str]:
    """Texts of the exported rows ``idx`` (positions across the parts listed in export.json)."""
    wanted = sorted({int(i) for i in idx.reshape(-1) if i >= 0})
    texts: dict[int, str] = {}
    start = 0
    for part in info.get("parts", []):
        end = start + int(part["rows"])
        local = [i - start for i in wanted if start <= i < end]
        if local:
            with out.fs.open(out.path(part["file"]), "rb") as fh:
                col = pq.read_table(fh, columns=[text_col]).column(text_col).take(local).to_pylist()
            texts.update({start + j: t for j, t in zip(local, col, strict=True)})
        start = end
    return texts

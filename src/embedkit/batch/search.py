"""Top-k search over a job's output: the FAISS index or ``.npy`` export when there is one, else a
streaming scan of the part files (memory bounded by a part). Queries are embedded with the model and
settings recorded in ``metadata.json``, so query and corpus vectors match.

Jobs made with BGE-M3's outputs (``--outputs dense,sparse,colbert``) are searched in any of M3's
modes (:data:`MODES`): ``dense`` (the inner product), ``sparse`` (the lexical matching score),
``colbert`` (late interaction) and ``hybrid``, the weighted sum of the three over the sum of the
weights (:func:`embedkit.engine.multi.hybrid_score`); all but dense scan the part files.

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

from embedkit.batch.export import EXPORT_DIR, JobOutput, colbert_rows, dense_matrix, load_export, sparse_rows
from embedkit.batch.settings import output_columns
from embedkit.engine.multi import HYBRID_WEIGHTS, OUTPUTS
from embedkit.errors import ConfigError, DeviceError, ModelNotFoundError
from embedkit.io.fs import join_fs

MODES = ("dense", "sparse", "colbert", "hybrid")

log = logging.getLogger(__name__)


@dataclass
class Hit:
    rank: int
    id: str
    # dense: inner product (cosine for normalised vectors), for l2 outputs the squared distance;
    # other modes: M3's score of the mode
    score: float
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


def parse_weights(value: str | tuple[float, ...] | list[float] | None) -> tuple[float, float, float]:
    """Hybrid weights of dense, sparse and ColBERT scores, from ``"0.4,0.2,0.4"`` or a sequence.

    >>> parse_weights("1, 0, 1")
    (1.0, 0.0, 1.0)
    """
    if value is None:
        return HYBRID_WEIGHTS
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        weights = tuple(float(w) for w in items)
    except (TypeError, ValueError):
        weights = ()
    if len(weights) != 3 or any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise ConfigError(
            f"--weights takes three numbers >= 0, not all 0, for the dense, sparse and ColBERT scores "
            f"(e.g. 0.4,0.2,0.4); got {value!r}"
        )
    return weights  # type: ignore[return-value]


def mode_outputs(mode: str, weights: tuple[float, float, float] = HYBRID_WEIGHTS) -> tuple[str, ...]:
    """The outputs a search ``mode`` reads (hybrid: those of non-zero weight)."""
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "hybrid":
        return (mode,)
    return tuple(o for o, w in zip(OUTPUTS, weights, strict=True) if w > 0)


def search_output(
    url: str,
    queries: list[str],
    *,
    k: int = 5,
    embedder: Any = None,
    model: str | None = None,
    prompt_name: str | None = None,
    mode: str = "dense",
    weights: str | tuple[float, ...] | None = None,
) -> list[list[Hit]]:
    """The ``k`` rows of ``url`` that score best against each query in ``mode`` (see :data:`MODES`;
    ``weights``: hybrid's, dense/sparse/ColBERT), best first."""
    if weights is not None and mode != "hybrid":
        raise ConfigError(f"--weights applies to --mode hybrid, not {mode}")
    w = parse_weights(weights)
    needed = mode_outputs(mode, w)
    out = JobOutput(url)
    out.require(needed, f"--mode {mode}")
    meta = out.metadata or {}
    emb = embedder or query_embedder(meta, model, prompt_name)
    text_col = (
        meta.get("text_column") if meta.get("text_column") in (meta.get("keep_columns") or []) else None
    )
    found = emb.embed_multi(list(queries), needed)  # dense alone: the engine's dense path
    q: dict[str, Any] = {o: getattr(found, o) for o in needed}
    exported = load_export(url) if mode == "dense" else None
    if exported is not None:
        dense = q["dense"]
        info, ids, vecs = exported
        scores, idx = _faiss_search(out, info, dense, k)
        if scores is None:
            scores, idx = _topk(dense, vecs, k, out.metric)
        texts = _texts_at(out, info, idx, text_col) if text_col else {}
        return [
            [
                Hit(r + 1, str(ids[i]), float(s), texts.get(int(i)))
                for r, (i, s) in enumerate(zip(row_i, row_s, strict=True))
                if i >= 0
            ]
            for row_i, row_s in zip(idx, scores, strict=True)
        ]
    return _scan(out, q, k, text_col, mode, w)


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
    scores, idx = _best(s, k)
    return (scores if metric == "ip" else -scores), idx


def _best(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` highest scores of ``s`` (queries, candidates) and their columns, best first."""
    k = min(k, s.shape[1])
    idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(s, idx, 1)
    order = np.argsort(-part, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, 1)
    return np.take_along_axis(s, idx, 1), idx


def mode_scores(
    table: Any, q: dict[str, Any], mode: str, weights: tuple[float, float, float] = HYBRID_WEIGHTS
) -> np.ndarray:
    """(queries, rows) M3 scores of ``table``'s rows (a part's output columns) in ``mode``: dense
    inner products, lexical matching, ColBERT late interaction, or their weighted mean (hybrid);
    ``q`` holds the queries' outputs the mode reads."""
    per: dict[str, np.ndarray] = {}
    if "dense" in q:
        per["dense"] = np.asarray(q["dense"], np.float32) @ dense_matrix(table).T
    if "sparse" in q:
        per["sparse"] = sparse_scores(q["sparse"], *sparse_rows(table))
    if "colbert" in q:
        per["colbert"] = colbert_scores(q["colbert"], *colbert_rows(table))
    if mode != "hybrid":
        return per[mode]
    used = [(w, per[o]) for o, w in zip(OUTPUTS, weights, strict=True) if o in per]
    return sum(w * s.astype(np.float64) for w, s in used) / sum(w for w, _ in used)


def sparse_scores(queries: list, offsets: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(queries, rows) lexical matching scores (:func:`embedkit.engine.multi.sparse_score`) of the
    rows whose token ids and weights are ``ids`` / ``weights`` cut at ``offsets``."""
    n = len(offsets) - 1
    rows = np.repeat(np.arange(n), np.diff(offsets))
    out = np.zeros((len(queries), n), np.float64)
    for qi, (q_ids, q_w) in enumerate(queries):
        if len(q_ids) == 0 or len(ids) == 0:
            continue
        order = np.argsort(q_ids)
        sorted_ids, sorted_w = q_ids[order], q_w[order].astype(np.float64)
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        hit = sorted_ids[pos] == ids
        prod = np.where(hit, sorted_w[pos] * weights.astype(np.float64), 0.0)
        out[qi] = np.bincount(rows, weights=prod, minlength=n)
    return out


def colbert_scores(
    queries: list[np.ndarray], offsets: np.ndarray, vectors: np.ndarray, block: int = 1 << 16
) -> np.ndarray:
    """(queries, rows) ColBERT late-interaction scores (:func:`embedkit.engine.multi.colbert_score`)
    of the rows whose vectors are ``vectors`` cut at ``offsets``, ``block`` vectors at a time."""
    n = len(offsets) - 1
    counts = np.diff(offsets)
    out = np.zeros((len(queries), n), np.float32)
    start = 0
    while start < n:
        stop = int(np.searchsorted(offsets, offsets[start] + block, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        lo, hi = int(offsets[start]), int(offsets[stop])
        keep = np.arange(start, stop)[counts[start:stop] > 0]
        if len(keep):
            docs = np.asarray(vectors[lo:hi], np.float32)
            starts = offsets[keep] - lo
            for qi, q in enumerate(queries):
                if len(q):
                    best = np.maximum.reduceat(np.asarray(q, np.float32) @ docs.T, starts, axis=1)
                    out[qi, keep] = best.sum(axis=0) / len(q)
        start = stop
    return out


def _scan(
    out: JobOutput,
    q: dict[str, Any],
    k: int,
    text_col: str | None,
    mode: str = "dense",
    weights: tuple[float, float, float] = HYBRID_WEIGHTS,
) -> list[list[Hit]]:
    """Stream the parts, keeping each query's best ``k`` (dense on an l2 output: the nearest)."""
    n_q = len(next(iter(q.values())))
    l2 = mode == "dense" and out.metric == "l2"
    best: list[list[tuple[float, str, str | None]]] = [[] for _ in range(n_q)]
    cols = ("id", *output_columns(tuple(q)), *((text_col,) if text_col else ()))
    for table in out.iter_tables(cols):
        ids = table.column("id").to_pylist()
        texts = table.column(text_col).to_pylist() if text_col else None
        if mode == "dense":
            scores, idx = _topk(q["dense"], dense_matrix(table), k, out.metric)
        else:
            scores, idx = _best(mode_scores(table, q, mode, weights), k)
        for qi in range(n_q):
            cand = best[qi] + [
                (float(s), ids[i], texts[i] if texts else None)
                for i, s in zip(idx[qi], scores[qi], strict=True)
            ]
            cand.sort(key=lambda c: c[0] if l2 else -c[0])
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

"""BGE-M3's three outputs from one forward pass: dense vectors, lexical weights and ColBERT vectors.

The definitions are FlagEmbedding's ``BGEM3FlagModel`` (the reference, matched to 1e-5 in fp32):

- **dense**: the model's pooled vector (CLS for BGE-M3), normalised;
- **sparse** (lexical weights): ``relu(sparse_linear(hidden))``, one weight per token, the maximum per
  token id, special tokens (CLS, EOS, PAD, UNK) and zero weights dropped;
- **colbert**: ``colbert_linear(hidden[1:])`` for every token after CLS (EOS included), each vector
  normalised.

Here a sparse vector is a pair of arrays, token ids (int32, in order of first occurrence) and
weights (float32); :meth:`MultiVectors.to_flag` gives FlagEmbedding's dicts. The scores below are
M3's: dense dot product, the lexical matching score (sum over shared ids of the weights' products),
and ColBERT's late interaction (the mean over query vectors of the best dot product with a
document's vectors).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from embedkit.errors import ConfigError
from embedkit.models.text import HEADS

OUTPUTS = ("dense", "sparse", "colbert")
DENSE_ONLY = ("dense",)
# M3's weights for hybrid scores: dense, sparse, ColBERT (FlagEmbedding's README uses 0.4/0.2/0.4).
HYBRID_WEIGHTS = (0.4, 0.2, 0.4)

Sparse = tuple[np.ndarray, np.ndarray]  # (token ids int32, weights float32)


def parse_outputs(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"dense,sparse"`` or ``["sparse"]`` as a tuple in :data:`OUTPUTS` order; ``None`` or empty
    means dense. Raises :class:`ConfigError` naming an unknown output."""
    if value is None:
        return DENSE_ONLY
    names = value.split(",") if isinstance(value, str) else list(value)
    wanted = {str(n).strip().lower() for n in names if str(n).strip()}
    unknown = sorted(wanted - set(OUTPUTS))
    if unknown:
        raise ConfigError(f"unknown output {', '.join(unknown)}: choose any of {', '.join(OUTPUTS)}")
    return tuple(o for o in OUTPUTS if o in wanted) or DENSE_ONLY


def sparse_from_token_weights(weights: np.ndarray, ids: np.ndarray, skip: np.ndarray) -> Sparse:
    """One text's lexical weights from its per-token ``weights`` and token ``ids`` (no padding):
    the maximum per id, ids in ``skip`` (special tokens) and weights <= 0 left out."""
    keep = (weights > 0) & ~np.isin(ids, skip)
    ids, weights = ids[keep], weights[keep]
    if ids.size == 0:
        return np.empty(0, np.int32), np.empty(0, np.float32)
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    best = np.zeros(len(uniq), np.float32)
    np.maximum.at(best, inverse, weights.astype(np.float32))
    order = np.argsort(first, kind="stable")  # FlagEmbedding's dicts keep first-occurrence order
    return uniq[order].astype(np.int32), best[order]


@dataclass
class MultiVectors:
    """The outputs asked for, per input in input order (``None`` for those not asked for)."""

    dense: np.ndarray | None
    sparse: list[Sparse] | None
    colbert: list[np.ndarray] | None
    token_counts: np.ndarray
    truncated: np.ndarray

    def __len__(self) -> int:
        return len(self.token_counts)

    def lexical_weights(self) -> list[dict[str, float]]:
        """The sparse output as FlagEmbedding's ``{token_id_str: weight}`` dicts."""
        return [
            {str(int(i)): float(w) for i, w in zip(ids, ws, strict=True)} for ids, ws in self.sparse or []
        ]

    def to_flag(self) -> dict:
        """FlagEmbedding's ``encode`` result: ``dense_vecs``, ``lexical_weights``, ``colbert_vecs``."""
        return {
            "dense_vecs": self.dense,
            "lexical_weights": self.lexical_weights() if self.sparse is not None else None,
            "colbert_vecs": self.colbert,
        }


def check_outputs(outputs: Sequence[str], available: Sequence[str], model: str) -> None:
    """Raise :class:`ConfigError` when ``outputs`` asks for a head ``model`` does not have."""
    missing = [o for o in outputs if o not in available]
    if missing:
        raise ConfigError(
            f"output {', '.join(missing)} asked for, but model {model} has no "
            f"{' or '.join(HEADS.get(m, m) for m in missing)} head (it gives: {', '.join(available)}); "
            f"use a BGE-M3 model folder that has the head files, or ask only for {', '.join(available)}"
        )


# ------------------------------------------------------------------------------------------ scores
def dense_scores(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """(queries, docs) dot products of dense vectors."""
    return np.asarray(queries, np.float32) @ np.asarray(docs, np.float32).T


def sparse_score(query: Sparse, doc: Sparse) -> float:
    """M3's lexical matching score: the sum over shared token ids of the two weights' product."""
    _, qi, di = np.intersect1d(query[0], doc[0], assume_unique=True, return_indices=True)
    return float(np.dot(query[1][qi].astype(np.float64), doc[1][di].astype(np.float64)))


def colbert_score(query: np.ndarray, doc: np.ndarray) -> float:
    """ColBERT late interaction: the mean over query vectors of the best dot product in ``doc``."""
    if len(query) == 0 or len(doc) == 0:
        return 0.0
    return float((query @ doc.T).max(axis=1).sum() / len(query))


def hybrid_score(scores: Sequence[float | None], weights: Sequence[float] = HYBRID_WEIGHTS) -> float:
    """M3's hybrid score (FlagEmbedding's ``compute_score``): the dense, sparse and ColBERT scores'
    weighted sum over the sum of the weights (``None`` scores and their weights are left out)."""
    pairs = [(w, s) for w, s in zip(weights, scores, strict=True) if s is not None]
    total = sum(w for w, _ in pairs)
    return float(sum(w * s for w, s in pairs) / total) if total else 0.0

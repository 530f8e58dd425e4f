"""BGE-M3 golden parity: embedkit's dense, sparse (lexical weights) and ColBERT outputs against BAAI's
FlagEmbedding (BGEM3FlagModel, fp32 on CPU, max_length 8192) on a tiny random BGE-M3 (``tiny_m3``).

The reference runs once a session in .venv-flagembedding (``m3_reference``, tests/reference_m3.py):
these tests skip without it (`make reference`) and fail under EMBEDKIT_REQUIRE_REFERENCE=1, which
``make test`` sets. The texts (tests.reference_m3.M3_TEXTS) run from one token to past 8,192.
"""

from __future__ import annotations

import numpy as np
import pytest

from embedkit import Embedder
from tests.reference_m3 import M3_LONG, M3_MAX_LENGTH, M3_TEXTS

TOL = 1e-5


@pytest.fixture(scope="module")
def m3_embedder(tiny_m3) -> Embedder:
    return Embedder(str(tiny_m3), device="cpu", backend="torch")


def test_m3_texts_are_as_long_as_claimed(m3_embedder):
    """The long texts are what the parity is meant to cover: three of 3,000-8,000 tokens and one
    truncated at 8,192; the short ones include one-token texts and one with no token at all."""
    tok = m3_embedder.tokenize(M3_TEXTS, truncate=True)
    lengths = [int(n) for n in tok.original_lengths]
    assert m3_embedder.model.max_seq_length == M3_MAX_LENGTH
    assert all(3000 <= lengths[i] <= 8000 for i in M3_LONG[:3]), [lengths[i] for i in M3_LONG]
    assert lengths[M3_LONG[-1]] > M3_MAX_LENGTH and int(tok.lengths[M3_LONG[-1]]) == M3_MAX_LENGTH
    assert 3 in lengths and 2 in lengths  # <s> x </s>; <s> </s>


def test_m3_tokens_match_reference(m3_embedder, m3_reference):
    """Both sides see the same token ids (transformers 5 here, 4.x there, truncated alike): a
    difference here explains any below."""
    ours = m3_embedder.tokenize(M3_TEXTS, truncate=True).ids
    for i, (got, want) in enumerate(zip(ours, m3_reference["input_ids"], strict=True)):
        assert got.tolist() == want.tolist(), f"text {i}: {M3_TEXTS[i][:60]!r}"


def test_m3_dense_default_matches_reference(m3_embedder, m3_reference):
    """Dense only (encode's default): CLS pooling + normalise, as for any sentence-transformers model."""
    got = m3_embedder.encode(M3_TEXTS)
    want = m3_reference["dense_vecs"]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == want.shape
    assert float(np.abs(got - want).max()) <= TOL


@pytest.fixture(scope="module")
def m3_outputs(m3_embedder) -> dict:
    return m3_embedder.encode(M3_TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)


def test_m3_dense_matches_reference(m3_outputs, m3_reference):
    got = m3_outputs["dense_vecs"]
    want = m3_reference["dense_vecs"]
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= TOL


def test_m3_lexical_weights_match_reference(m3_outputs, m3_reference):
    """Same token ids per text (str keys; <s>, </s>, <pad>, <unk> and zero weights left out, the
    largest weight of a repeated token kept) with weights within 1e-5."""
    got, want = m3_outputs["lexical_weights"], m3_reference["lexical_weights"]
    assert len(got) == len(want) == len(M3_TEXTS)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert all(isinstance(k, str) for k in g), f"text {i}: keys must be token ids as str"
        assert set(g) == set(w), f"text {i}: {M3_TEXTS[i][:60]!r}: {sorted(set(g) ^ set(w))[:10]}"
        worst = max((abs(float(g[k]) - w[k]) for k in w), default=0.0)
        assert worst <= TOL, f"text {i}: weights differ by {worst}"


def test_m3_colbert_vecs_match_reference(m3_outputs, m3_reference):
    """One (tokens - 1, dim) float32 array per text (every token after <s>, </s> included)."""
    got, want = m3_outputs["colbert_vecs"], m3_reference["colbert_vecs"]
    assert len(got) == len(want) == len(M3_TEXTS)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        g = np.asarray(g)
        assert g.dtype == np.float32 and g.shape == w.shape, f"text {i}: {g.shape} vs {w.shape}"
        assert float(np.abs(g - w).max(initial=0.0)) <= TOL, f"text {i}"


def _scores(outputs: dict, q: int, p: int) -> dict[str, float]:
    """FlagEmbedding's scores of one pair from encode's outputs: dense q·p,
    compute_lexical_matching_score (the shared tokens' weight products) and colbert_score (each
    query vector's best passage match, averaged)."""
    dense = float(outputs["dense_vecs"][q] @ outputs["dense_vecs"][p])
    lq, lp = outputs["lexical_weights"][q], outputs["lexical_weights"][p]
    sparse = float(sum(w * lp[t] for t, w in lq.items() if t in lp))
    cq, cp = np.asarray(outputs["colbert_vecs"][q]), np.asarray(outputs["colbert_vecs"][p])
    colbert = float((cq @ cp.T).max(axis=1).sum() / cq.shape[0])
    return {"dense": dense, "sparse": sparse, "colbert": colbert}


def test_m3_pair_scores_match_reference(m3_outputs, m3_reference):
    """The scores a hybrid search combines, from embedkit's outputs, against FlagEmbedding's own
    functions and its compute_score (the weighted hybrid) on the same pairs."""
    (wd, ws, wc), hybrid = m3_reference["weights"], m3_reference["compute_score"]
    for n, ref in enumerate(m3_reference["pair_scores"]):
        got = _scores(m3_outputs, ref["query"], ref["passage"])
        for kind in ("dense", "sparse", "colbert"):
            assert got[kind] == pytest.approx(ref[kind], abs=1e-5), (n, kind)
            assert got[kind] == pytest.approx(hybrid[kind][n], abs=1e-5), (n, kind)
        combined = (wd * got["dense"] + ws * got["sparse"] + wc * got["colbert"]) / (wd + ws + wc)
        assert combined == pytest.approx(hybrid["colbert+sparse+dense"][n], abs=1e-5), n


def test_m3_outputs_not_asked_for_are_none(m3_embedder, m3_reference):
    """As BGEM3FlagModel.encode: a dict whenever sparse or ColBERT is asked for, None for the rest."""
    texts = M3_TEXTS[:4]
    sparse = m3_embedder.encode(texts, return_dense=False, return_sparse=True)
    assert sparse["dense_vecs"] is None and sparse["colbert_vecs"] is None
    for got, want in zip(sparse["lexical_weights"], m3_reference["lexical_weights"][:4], strict=True):
        assert dict(got) == pytest.approx(want, abs=TOL)
    colbert = m3_embedder.encode(texts, return_dense=False, return_colbert_vecs=True)
    assert colbert["dense_vecs"] is None and colbert["lexical_weights"] is None
    assert [v.shape for v in colbert["colbert_vecs"]] == [v.shape for v in m3_reference["colbert_vecs"][:4]]

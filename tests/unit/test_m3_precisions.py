"""BGE-M3's outputs at the reduced precisions: the same shapes and keys' kind as fp32, float32 arrays,
and vectors close to fp32's (exactness is fp32's, checked against FlagEmbedding elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from embedkit import Embedder

TEXTS = ["the quick brown fox jumps over the lazy dog", "def main(argv): return 0", "x"]


@pytest.fixture(scope="module")
def exact(tiny_m3):
    return Embedder(str(tiny_m3), device="cpu", backend="torch").embed_multi(TEXTS)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precisions_give_all_three_outputs_close_to_fp32(tiny_m3, exact, precision):
    got = Embedder(str(tiny_m3), device="cpu", precision=precision, backend="torch").embed_multi(TEXTS)
    assert got.dense.dtype == np.float32 and got.dense.shape == exact.dense.shape
    cos = (got.dense * exact.dense).sum(1)
    assert cos.min() > 0.98, cos
    for (ids, weights), (ref_ids, _) in zip(got.sparse, exact.sparse, strict=True):
        assert weights.dtype == np.float32 and ids.dtype == np.int32
        assert len(set(ids) & set(ref_ids)) >= 0.8 * len(ref_ids)
    for vecs, ref in zip(got.colbert, exact.colbert, strict=True):
        assert vecs.dtype == np.float32 and vecs.shape == ref.shape
        assert (vecs * ref).sum(1).min() > 0.95

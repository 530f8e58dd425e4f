"""Golden parity on the real default model: fp32 exact, bf16/int8 close, against sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest

from embedkit import Embedder
from embedkit.engine.device import cpu_supports_bf16
from embedkit.models import default_model_path
from tests.parity_texts import parity_texts

pytestmark = pytest.mark.slow  # ~45 s: the real default model on 2 cores


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    texts = parity_texts()
    assert len(texts) >= 200
    st = SentenceTransformer(str(default_model_path()), device="cpu")
    return texts, st.encode(texts, batch_size=32)


@pytest.mark.parametrize("backend", ["torch", "onnx", "auto"])
def test_fp32_matches_sentence_transformers_to_1e5(reference, backend):
    texts, ref = reference
    emb = Embedder("default", device="cpu", backend=backend)
    got = emb.encode(texts)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= 1e-5
    # one text at a time: the small batches auto sends to ONNX Runtime where it measured faster
    singles = np.stack([emb.encode(t) for t in texts[:20]])
    assert float(np.abs(singles - ref[:20]).max()) <= 1e-5
    if backend == "onnx":
        assert emb.stats.onnx_batches == emb.stats.batches


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_min_cosine_at_least_099(reference, precision):
    if precision == "bf16" and not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    if precision == "int8":
        from embedkit.engine.device import cpu_supports_int8
        from embedkit.engine.int8 import int8_supported

        if not int8_supported():
            pytest.skip("this torch build has no CPU int8 matmul")
        if not cpu_supports_int8():
            pytest.skip("this CPU has no int8 dot products (VNNI/AMX): int8 runs at ~1 GOP/s here")
    texts, ref = reference
    got = Embedder("default", device="cpu", precision=precision).encode(texts)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert float(cos.min()) >= 0.99

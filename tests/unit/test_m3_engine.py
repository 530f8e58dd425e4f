"""BGE-M3's outputs in the engine: heads, one forward pass, FlagEmbedding's encode() shape, errors.

Parity with FlagEmbedding itself is in tests/integration/test_m3_parity.py (its own venv); these
tests check the definitions directly against the model's own modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedkit import Embedder
from embedkit.engine.batching import plan_batches
from embedkit.engine.multi import (
    colbert_score,
    hybrid_score,
    parse_outputs,
    sparse_from_token_weights,
    sparse_score,
)
from embedkit.errors import ConfigError, InputError, ModelLoadError
from embedkit.testing import add_m3_heads, build_tiny_bert

TEXTS = [
    "the cat sat on the mat and the cat slept",
    "a",
    "photo of a dog in the park",
    " ",
    "the the the",
]


@pytest.fixture(scope="module")
def m3(tmp_path_factory) -> Embedder:
    path = build_tiny_bert(
        tmp_path_factory.mktemp("m3"), arch="xlm-roberta", pooling="cls", max_seq_length=48
    )
    return Embedder(str(add_m3_heads(path, colbert_dim=24)), device="cpu", backend="torch")


def _reference(emb: Embedder, texts: list[str]) -> dict:
    """The outputs computed straight from the model's modules, one text at a time (no padding)."""
    tok = emb.model.tokenizer
    special = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    out: dict = {"dense": [], "sparse": [], "colbert": []}
    for text in texts:
        enc = tok([text], return_tensors="pt", truncation=True, max_length=emb.max_seq_length)
        with torch.no_grad():
            hidden = emb.model.transformer(**enc).last_hidden_state
            weights = torch.relu(emb.model.heads["sparse"](hidden))[0, :, 0].numpy()
            colbert = torch.nn.functional.normalize(emb.model.heads["colbert"](hidden[0, 1:]), dim=-1)
        out["dense"].append(torch.nn.functional.normalize(hidden[0, 0], dim=-1).numpy())
        lexical: dict[str, float] = {}
        for i, w in zip(enc["input_ids"][0].tolist(), weights, strict=True):
            if i not in special and w > 0 and w > lexical.get(str(i), 0):
                lexical[str(i)] = float(w)
        out["sparse"].append(lexical)
        out["colbert"].append(colbert.numpy())
    return out


def test_heads_are_detected_and_listed(m3):
    assert m3.outputs == ("dense", "sparse", "colbert")
    assert m3.describe()["outputs"] == ["dense", "sparse", "colbert"]


def test_all_outputs_match_the_definitions_and_dense_is_unchanged(m3):
    got = m3.encode(TEXTS, return_sparse=True, return_colbert_vecs=True)
    ref = _reference(m3, TEXTS)
    np.testing.assert_allclose(got["dense_vecs"], np.stack(ref["dense"]), atol=1e-6)
    np.testing.assert_array_equal(got["dense_vecs"], m3.encode(TEXTS))  # the same pass as dense alone
    for i, (lexical, expected) in enumerate(zip(got["lexical_weights"], ref["sparse"], strict=True)):
        assert list(lexical) == list(expected), i  # same ids, first-occurrence order
        np.testing.assert_allclose(list(lexical.values()), list(expected.values()), atol=1e-6)
    for vecs, expected in zip(got["colbert_vecs"], ref["colbert"], strict=True):
        assert vecs.shape == expected.shape and vecs.shape[1] == 24
        np.testing.assert_allclose(vecs, expected, atol=1e-6)


def test_only_what_is_asked_is_returned(m3):
    got = m3.encode(TEXTS, return_dense=False, return_sparse=True)
    assert got["dense_vecs"] is None and got["colbert_vecs"] is None
    assert len(got["lexical_weights"]) == len(TEXTS)
    with pytest.raises(InputError, match="at least one output"):
        m3.encode(TEXTS, return_dense=False)


def test_dense_alone_through_the_multi_api_is_the_dense_path(m3):
    got = m3.embed_multi(TEXTS, ("dense",))
    np.testing.assert_array_equal(got.dense, m3.encode(TEXTS))
    assert got.sparse is None and got.colbert is None and len(got) == len(TEXTS)


def test_one_string_gives_one_texts_outputs(m3):
    one = m3.encode(TEXTS[0], return_sparse=True, return_colbert_vecs=True)
    many = m3.encode(TEXTS, return_sparse=True, return_colbert_vecs=True)
    assert one["dense_vecs"].shape == (32,)
    assert one["lexical_weights"] == pytest.approx(many["lexical_weights"][0])
    np.testing.assert_allclose(one["colbert_vecs"], many["colbert_vecs"][0], atol=1e-6)


def test_token_ids_read_as_tokens(m3):
    weights = m3.encode(["the cat sat"], return_dense=False, return_sparse=True)["lexical_weights"]
    named = m3.convert_id_to_token(weights[0])
    assert set(named) <= {"the", "cat", "sat"} and sorted(named.values()) == sorted(weights[0].values())
    assert m3.convert_id_to_token(weights) == [named]


def test_a_missing_head_is_a_clear_error(tiny_embedder):
    assert tiny_embedder.outputs == ("dense",)
    with pytest.raises(ConfigError, match=r"sparse_linear\.pt"):
        tiny_embedder.encode(["a"], return_sparse=True)


def test_a_head_of_another_model_is_refused(tmp_path):
    path = build_tiny_bert(tmp_path / "m", arch="xlm-roberta", pooling="cls")
    torch.save(torch.nn.Linear(64, 1).state_dict(), path / "sparse_linear.pt")
    with pytest.raises(ModelLoadError, match="hidden size is 32"):
        Embedder(str(path), device="cpu")
    (path / "sparse_linear.pt").write_bytes(b"not a state dict")
    with pytest.raises(ModelLoadError, match=r"sparse_linear\.pt"):
        Embedder(str(path), device="cpu")


def test_parse_outputs():
    assert parse_outputs(None) == ("dense",)
    assert parse_outputs("colbert, dense") == ("dense", "colbert")
    assert parse_outputs(["sparse"]) == ("sparse",)
    with pytest.raises(ConfigError, match="unknown output lexical"):
        parse_outputs("dense,lexical")


def test_sparse_keeps_the_maximum_per_id_and_drops_specials_and_zeros():
    ids, weights = sparse_from_token_weights(
        np.array([0.5, 0.0, 0.2, 0.9, 0.3, 0.7], np.float32), np.array([0, 7, 5, 7, 5, 2]), np.array([0, 2])
    )
    assert ids.tolist() == [5, 7] and weights.tolist() == pytest.approx([0.3, 0.9])
    empty = sparse_from_token_weights(np.zeros(3, np.float32), np.array([4, 5, 6]), np.array([0]))
    assert empty[0].size == 0 and empty[0].dtype == np.int32


def test_scores_follow_m3():
    q = (np.array([3, 9], np.int32), np.array([0.5, 2.0], np.float32))
    d = (np.array([9, 4, 3], np.int32), np.array([1.0, 1.0, 4.0], np.float32))
    assert sparse_score(q, d) == pytest.approx(0.5 * 4.0 + 2.0 * 1.0)
    qv, dv = np.eye(2, 3, dtype=np.float32), np.array([[1, 0, 0], [0, 0.5, 0]], np.float32)
    assert colbert_score(qv, dv) == pytest.approx((1.0 + 0.5) / 2)
    assert hybrid_score([1.0, 2.0, 3.0]) == pytest.approx(0.4 * 1 + 0.2 * 2 + 0.4 * 3)
    assert hybrid_score([1.0, None, 3.0], [1, 1, 3]) == pytest.approx((1 + 9) / 4)


def test_attention_cells_bound_long_batches_not_short_ones():
    lengths = np.array([8192, 8000, 16, 16, 16, 16])
    batches = plan_batches(lengths, 1 << 20, max_attention_cells=100_000_000)
    assert [len(b) for b in batches] == [1, 1, 4]
    assert [len(b) for b in plan_batches(lengths, 1 << 20)] == [6]  # 6 x 8192 padded: fits tokens


def test_engine_sizes_the_attention_bound_from_the_heads(m3):
    heads = m3.model.transformer.config.num_attention_heads
    assert 0 < m3.max_attention_cells * 8 * heads <= 1 << 50

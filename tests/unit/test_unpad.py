"""The unpadded encoder forward: same vectors as the padded forward, for the models it covers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from embedkit import Embedder
from embedkit.engine.unpad import CHUNK_SLACK, UnpaddedEncoder, attention_chunks, can_unpad
from embedkit.testing import build_tiny_bert

# Mixed lengths in one batch: a lone word, equal pairs, an outlier past max_seq_length (cut).
TEXTS = [
    "a",
    "the cat sat on the mat",
    "the dog sat on the rug",
    "embeddings map text to vectors " * 3,
    "short one",
    "a much longer passage about tokenizers and padding and batches " * 6,
    "x y",
]


@pytest.fixture(scope="module", params=["bert", "xlm-roberta"])
def arch_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"unpad-{request.param}")
    return build_tiny_bert(path, arch=request.param, max_seq_length=48)


def test_unpadded_vectors_match_the_padded_forward(arch_model):
    unpadded = Embedder(str(arch_model), device="cpu", backend="torch")
    padded = Embedder(str(arch_model), device="cpu", backend="torch", unpad=False)
    assert unpadded.unpadded and isinstance(unpadded._transformer, UnpaddedEncoder)
    assert not padded.unpadded and not isinstance(padded._transformer, UnpaddedEncoder)
    assert unpadded.describe()["unpadded"] is True
    a, b = unpadded.encode(TEXTS), padded.encode(TEXTS)
    assert np.abs(a - b).max() <= 1e-5
    # one text and a batch of equal lengths (no padding: the model's own forward) agree too
    for texts in (TEXTS[:1], TEXTS[1:3], TEXTS[::-1]):
        assert np.abs(unpadded.encode(texts) - padded.encode(texts)).max() <= 1e-5


def test_a_batch_with_little_padding_runs_the_model_s_own_forward(tiny_model):
    """Packing costs more than it saves below PACK_MIN_PADDING: such a batch (length-sorted bulk)
    gets exactly the padded forward's bits; a mixed batch is packed."""
    from embedkit.engine import unpad

    unpadded = Embedder(str(tiny_model), device="cpu", backend="torch")
    padded = Embedder(str(tiny_model), device="cpu", backend="torch", unpad=False)
    calls: list[int] = []
    real = unpadded._transformer._layers
    unpadded._transformer._layers = lambda h, chunks: calls.append(len(chunks)) or real(h, chunks)
    equal = ["the cat sat on the mat", "on the mat the cat sat"]  # the same words: equal lengths
    assert np.array_equal(unpadded.encode(equal), padded.encode(equal)) and not calls
    assert unpadded.encode(TEXTS).shape == (len(TEXTS), 32) and calls
    assert unpad.PACK_MIN_PADDING < 0.5


def test_hidden_states_match_at_real_tokens_and_are_zero_at_padding(arch_model):
    emb = Embedder(str(arch_model), device="cpu", backend="torch", unpad=False)
    encoder = UnpaddedEncoder(emb._transformer)  # wraps the prepared (padded) model
    tok = emb.tokenize(TEXTS)
    ids, mask = emb._to_tensors(tok.ids)
    with torch.inference_mode():
        want = emb._transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        (got,) = encoder(ids, mask)
    real = mask.bool()
    assert got.shape == want.shape
    assert (got[real] - want[real]).abs().max().item() <= 1e-5
    assert got[~real].abs().max().item() == 0.0
    # the stacked query/key/value weights are the only copy: the originals are views of them
    att = emb._transformer.encoder.layer[0].attention.self
    stacked = encoder.qkv[0].linear.weight
    assert att.query.weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    # and stay views when the module moves (a replica's .to(device) moves each parameter alone)
    moved = encoder.to(torch.float64)
    assert (
        att.key.weight.untyped_storage().data_ptr() == moved.qkv[0].linear.weight.untyped_storage().data_ptr()
    )


def test_bf16_unpadded_stays_close_to_the_padded_forward(tiny_model):
    unpadded = Embedder(str(tiny_model), device="cpu", backend="torch", precision="bf16")
    padded = Embedder(str(tiny_model), device="cpu", backend="torch", precision="bf16", unpad=False)
    assert unpadded.unpadded
    a, b = unpadded.encode(TEXTS), padded.encode(TEXTS)
    assert (a * b).sum(axis=1).min() >= 0.999


def test_models_it_does_not_cover_keep_their_forward(tmp_path, tiny_model):
    mpnet = Embedder(str(build_tiny_bert(tmp_path / "mpnet", arch="mpnet")), device="cpu", backend="torch")
    assert not mpnet.unpadded
    assert "mpnet" in (can_unpad(mpnet._transformer) or "")
    int8 = Embedder(str(tiny_model), device="cpu", backend="torch", precision="int8")
    assert not int8.unpadded
    assert "int8" in (can_unpad(int8._transformer) or "")
    assert int8.encode(TEXTS).shape == (len(TEXTS), int8.dimension)


def test_multi_outputs_match_the_padded_forward(small_m3):
    unpadded = Embedder(str(small_m3), device="cpu", backend="torch")
    padded = Embedder(str(small_m3), device="cpu", backend="torch", unpad=False)
    assert unpadded.unpadded
    a = unpadded.encode(TEXTS, return_sparse=True, return_colbert_vecs=True)
    b = padded.encode(TEXTS, return_sparse=True, return_colbert_vecs=True)
    assert np.abs(a["dense_vecs"] - b["dense_vecs"]).max() <= 1e-5
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"], strict=True):
        assert x.shape == y.shape and np.abs(x - y).max() <= 1e-5
    for x, y in zip(a["lexical_weights"], b["lexical_weights"], strict=True):
        assert x.keys() == y.keys()
        assert max(abs(x[k] - y[k]) for k in x) <= 1e-5


@pytest.mark.parametrize(
    "lengths",
    [[5], [3, 3, 3], [5, 5, 6, 16, 256], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [10] * 5 + [200] * 3, [7, 300]],
)
def test_attention_chunks_cover_every_row_once_within_the_slack(lengths):
    chunks = attention_chunks(lengths)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    for first, last in chunks:
        rows = lengths[first:last]
        assert last - first == 1 or max(rows) * len(rows) <= CHUNK_SLACK * sum(rows)


def test_the_setting_turns_it_off(tiny_model, monkeypatch):
    from embedkit.engine import build_embedder
    from embedkit.settings import EngineSettings

    monkeypatch.setenv("EMBEDKIT_UNPAD", "0")
    off = build_embedder(EngineSettings.resolve({"model": str(tiny_model), "device": "cpu"}))
    assert off.unpad is False and not off.unpadded
    monkeypatch.delenv("EMBEDKIT_UNPAD")
    assert build_embedder(EngineSettings.resolve({"model": str(tiny_model), "device": "cpu"})).unpadded

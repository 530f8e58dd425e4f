"""BGE-M3's outputs in the server, as pure functions and on the batcher: parameters, codecs (npz,
npy, float16), the answer's JSON and arrays, the response-size bound, and merged batches."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import orjson
import pytest

from embedkit.engine.multi import MultiVectors
from embedkit.errors import InputError, NotAcceptableError, PayloadTooLargeError
from embedkit.server import codecs
from embedkit.server.batcher import Batcher
from embedkit.server.contracts import Limits, hf, openai, search, tei
from embedkit.server.contracts import m3 as m3c
from embedkit.server.errors import ModelCapabilityError, http_error
from embedkit.server.settings import ServerSettings

LIMITS = Limits(dimension=8, max_client_batch_size=4)


@pytest.fixture(scope="module")
def m3_embedder(small_m3):
    from embedkit import Embedder

    return Embedder(str(small_m3), device="cpu")


def sample(n: int = 2, dim: int = 4) -> MultiVectors:
    rng = np.random.default_rng(0)
    lengths = np.array([5, 3, 7, 2][:n])
    return MultiVectors(
        dense=rng.standard_normal((n, dim)).astype(np.float32),
        sparse=[
            (np.array([9, 2, 40][: k + 1], np.int32), rng.random(k + 1).astype(np.float32)) for k in range(n)
        ],
        colbert=[rng.standard_normal((int(t) - 1, dim)).astype(np.float32) for t in lengths],
        token_counts=lengths,
        truncated=np.zeros(n, bool),
    )


# ------------------------------------------------------------------------------------- parameters
def test_parameters_choose_outputs_in_m3_order_and_dense_stays_the_default():
    req = hf.parse({"inputs": ["a"]}, LIMITS)
    assert (req.outputs, req.dtype, req.multi) == (("dense",), "float32", False)
    params = {"return_colbert_vecs": True, "return_sparse": True, "dtype": "float16"}
    req = hf.parse({"inputs": ["a"], "parameters": params}, LIMITS)
    assert (req.outputs, req.dtype, req.multi) == (("dense", "sparse", "colbert"), "float16", True)
    req = search.parse(
        {"search_term": "a", "parameters": {"return_dense": False, "return_sparse": True}}, LIMITS
    )
    assert req.outputs == ("sparse",) and req.single


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"return_dense": False}, "asks for no output"),
        ({"return_sparse": "yes"}, "return_sparse must be true or false"),
        ({"dtype": "int8"}, "dtype must be 'float32' or 'float16'"),
        ({"return_sparse_vecs": True}, "return_colbert_vecs, dtype"),
    ],
)
def test_bad_m3_parameters_are_400s_naming_the_field(params, match):
    with pytest.raises(InputError, match=match):
        hf.parse({"inputs": "a", "parameters": params}, LIMITS)


def test_float16_applies_to_dense_answers_too_and_nothing_changes_without_it():
    vecs = np.full((1, 8), 0.1234567, np.float32)
    assert hf.respond(hf.parse({"inputs": "a"}, LIMITS), vecs)["embeddings"].dtype == np.float32
    req = hf.parse({"inputs": "a", "parameters": {"dtype": "float16"}}, LIMITS)
    assert (
        codecs.encode(hf.respond(req, vecs), codecs.JSON)
        == b'{"embeddings":[' + b",".join([b"0.12347"] * 8) + b"]}"
    )


@pytest.mark.parametrize(
    "payload",
    [{"input": "a", "return_sparse": True}, {"input": "a", "parameters": {"return_colbert_vecs": 1}}],
)
def test_the_openai_route_refuses_m3_parameters_and_says_where_they_go(payload):
    with pytest.raises(InputError, match=r"dense vectors only.*/embed_sparse"):
        openai.parse(payload, LIMITS)
    assert openai.parse({"input": "a", "parameters": {"normalize": True}}, LIMITS)[0].texts == ["a"]


def test_tei_embed_sparse_parses_like_tei_and_answers_index_value_lists():
    req = tei.parse_sparse({"inputs": "a"}, LIMITS)
    assert (req.texts, req.truncate, req.outputs) == (["a"], False, ("sparse",))
    mv = sample()
    body = orjson.loads(codecs.dumps(tei.respond_sparse(mv.sparse)))
    assert len(body) == 2 and [[e["index"] for e in item] for item in body] == [[9], [9, 2]]
    got = np.asarray([e["value"] for e in body[1]], np.float32)  # float32's shortest decimals
    assert np.array_equal(got, mv.sparse[1][1])


def test_no_sparse_head_on_a_tei_route_is_424_backend_as_tei_answers():
    status, body, _ = http_error(ModelCapabilityError("/embed_sparse: no sparse_linear.pt"))
    assert (status, body["error_type"]) == (424, "Backend")


def test_max_response_bytes_is_a_setting_with_env_and_a_lower_bound():
    assert ServerSettings().max_response_bytes == 64 * 1024 * 1024
    assert ServerSettings.from_env({"EMBEDKIT_MAX_RESPONSE_BYTES": "6291456"}).max_response_bytes == 6291456
    with pytest.raises(Exception, match="max_response_bytes must be at least 1"):
        ServerSettings(max_response_bytes=0)


# ----------------------------------------------------------------------------------------- codecs
def test_float16_json_numbers_are_short_and_read_back_to_the_same_float16():
    every = np.arange(65536, dtype=np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]
    back = np.asarray(orjson.loads(codecs.dumps(codecs.short_float16(finite))), np.float64).astype(np.float16)
    assert np.array_equal(back.view(np.uint16), finite.view(np.uint16))


def test_npz_is_negotiated_and_a_dense_answer_in_npz_is_its_dense_member():
    assert codecs.negotiate("application/x-npz") == codecs.NPZ
    vecs = np.arange(6, dtype=np.float32).reshape(2, 3)
    z = np.load(io.BytesIO(codecs.encode({"embeddings": vecs}, codecs.NPZ)))
    assert z.files == ["dense"] and np.array_equal(z["dense"], vecs)
    half = np.load(io.BytesIO(codecs.encode({"embeddings": vecs.astype(np.float16)}, codecs.NPY)))
    assert half.dtype == np.float16 and np.array_equal(half, vecs)
    assert codecs.encode(vecs.astype(np.float16)[:1] / 7, codecs.CSV) == b"0.0,0.14282,0.28564\n"


# ----------------------------------------------------------------------------------------- answer
def test_the_json_answer_uses_flagembedding_names_and_unwraps_a_single_input():
    mv = sample(n=1)
    single = m3c.MultiAnswer(mv, ("dense", "sparse", "colbert"), single=True).to_json()
    assert set(single) == {"embeddings", "lexical_weights", "colbert_vecs"}
    assert single["embeddings"].shape == (4,) and single["colbert_vecs"].shape == (4, 4)
    assert list(single["lexical_weights"]) == ["9"]
    listed = orjson.loads(m3c.MultiAnswer(sample(), ("sparse",)).encode(codecs.JSON))
    assert list(listed) == ["lexical_weights"] and [list(d) for d in listed["lexical_weights"]] == [
        ["9"],
        ["9", "2"],
    ]
    search_single = m3c.MultiAnswer(mv, ("dense", "sparse"), single=True, dense_key="embedding").to_json()
    assert set(search_single) == {"embedding", "lexical_weights"}


def test_npz_members_are_csr_style_and_decode_to_each_inputs_arrays():
    mv = sample(n=3)
    body = m3c.MultiAnswer(mv, ("dense", "sparse", "colbert")).encode(codecs.NPZ)
    z = np.load(io.BytesIO(body), allow_pickle=False)
    assert np.array_equal(z["dense"], mv.dense)
    cuts = z["colbert_offsets"][1:-1]
    assert z["colbert_offsets"].tolist() == [0, 4, 6, 12]
    for got, want in zip(np.split(z["colbert"], cuts), mv.colbert, strict=True):
        assert np.array_equal(got, want)
    ids = np.split(z["sparse_ids"], z["sparse_offsets"][1:-1])
    weights = np.split(z["sparse_weights"], z["sparse_offsets"][1:-1])
    for i, w, (want_i, want_w) in zip(ids, weights, mv.sparse, strict=True):
        assert np.array_equal(i, want_i) and np.array_equal(w, want_w) and i.dtype == np.int32
    half = np.load(io.BytesIO(m3c.MultiAnswer(mv, ("colbert",), dtype="float16").encode(codecs.NPZ)))
    assert half.files == ["colbert", "colbert_offsets"] and half["colbert"].dtype == np.float16


def test_npy_carries_one_array_only_and_other_types_are_406_before_compute():
    one = sample(n=1)
    arr = np.load(io.BytesIO(m3c.MultiAnswer(one, ("colbert",)).encode(codecs.NPY)))
    assert np.array_equal(arr, one.colbert[0])
    m3c.check_accept(("colbert",), 1, codecs.NPY)
    for outputs, count, accept in [
        (("colbert",), 2, codecs.NPY),
        (("sparse",), 1, codecs.NPY),
        (("dense", "colbert"), 1, codecs.NPY),
        (("dense", "sparse"), 1, codecs.CSV),
        (("sparse",), 1, codecs.JSONLINES),
    ]:
        with pytest.raises(NotAcceptableError, match="application/x-npz"):
            m3c.check_accept(outputs, count, accept)


def test_the_size_bound_before_compute_never_exceeds_the_real_answer():
    mv = sample(n=3)
    outputs = ("dense", "sparse", "colbert")
    for accept in (codecs.JSON, codecs.NPZ):
        for dtype in ("float32", "float16"):
            least = m3c.least_bytes(
                mv.token_counts, outputs, dense_dim=4, colbert_dim=4, accept=accept, dtype=dtype
            )
            real = len(m3c.MultiAnswer(mv, outputs, dtype=dtype).encode(accept))
            assert 0 < least <= real
    numbers = 3 * 4 + (4 + 2 + 6) * 4
    assert (
        m3c.least_bytes(
            mv.token_counts, outputs, dense_dim=4, colbert_dim=4, accept=codecs.NPZ, dtype="float16"
        )
        == 2 * numbers
    )


def test_the_413_names_the_limit_the_size_and_how_to_stay_under():
    err = m3c.too_large(5000, 1000, accept=codecs.JSON, outputs=("colbert",), at_least=True)
    assert isinstance(err, PayloadTooLargeError) and err.http_status == 413
    for needle in (
        "at least 5000 bytes",
        "limit of 1000 bytes",
        "fewer",
        "application/x-npz",
        "float16",
        "EMBEDKIT_MAX_RESPONSE_BYTES",
    ):
        assert needle in err.message
    sparse_only = m3c.too_large(5000, 1000, accept=codecs.JSON, outputs=("sparse",), binary=False).message
    assert "npz" not in sparse_only and "float16" not in sparse_only and "would be 5000 bytes" in sparse_only


# ---------------------------------------------------------------------------------------- batcher
def test_merged_m3_requests_share_one_pass_for_their_union_and_dense_ones_keep_their_path(
    m3_embedder, monkeypatch
):
    emb = m3_embedder
    texts = [["the cat sat on the mat"], ["a dog", "ran in the park"], ["hello world"], ["dense only here"]]
    asked = [("sparse",), ("dense", "colbert"), ("sparse", "colbert"), ("dense",)]
    calls: list[tuple] = []
    real_multi = emb.embed_tokenized_multi

    def spy(tok, outputs, **kw):
        calls.append(tuple(outputs))
        return real_multi(tok, outputs, **kw)

    monkeypatch.setattr(emb, "embed_tokenized_multi", spy)

    async def main():
        b = Batcher(emb, max_wait_s=0.0, max_queue_tokens=100_000)
        futs = [b.submit(emb.tokenize(t), outputs=o) for t, o in zip(texts, asked, strict=True)]
        b.start(asyncio.get_running_loop())  # started after queueing: one merged batch
        out = await asyncio.gather(*futs)
        b.stop()
        return out

    out = asyncio.run(main())
    assert calls == [("dense", "sparse", "colbert")]  # one pass for the three M3 requests
    assert isinstance(out[3], np.ndarray) and np.array_equal(out[3], emb.encode(texts[3]))
    for got, t, o in zip(out[:3], texts[:3], asked[:3], strict=True):
        want = real_multi(emb.tokenize(t), o)
        assert (got.dense is None) == ("dense" not in o) and (got.sparse is None) == ("sparse" not in o)
        assert (got.colbert is None) == ("colbert" not in o) and len(got) == len(t)
        if got.dense is not None:
            np.testing.assert_allclose(got.dense, want.dense, atol=1e-6)
        for (gi, gw), (wi, ww) in zip(got.sparse or [], want.sparse or [], strict=True):
            assert np.array_equal(gi, wi)
            np.testing.assert_allclose(gw, ww, atol=1e-6)
        for gc, wc in zip(got.colbert or [], want.colbert or [], strict=True):
            assert gc.shape == wc.shape
            np.testing.assert_allclose(gc, wc, atol=1e-6)

"""The client's BGE-M3 pieces without a network: which contract carries which output, request
bodies, decoding npz and JSON answers, merging split requests."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from embedkit.client import EmbeddingClient, ResponseFormatError
from embedkit.client.contracts import (
    HFMultiContract,
    TEISparseContract,
    make_contract,
    merge_flags,
    plan_requests,
)
from embedkit.client.retry import WireResponse
from embedkit.client.transports import base_url
from embedkit.errors import ConfigError, InputError

ALL = ("dense", "sparse", "colbert")


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_hf_carries_every_output_in_one_request_with_its_parameters():
    (c,) = make_contract("hf").multi(("sparse", "colbert"))
    assert isinstance(c, HFMultiContract) and c.route is None and c.accept.startswith("application/x-npz")
    body = json.loads(c.encode(["a", "b"], {"dtype": "float16", "truncate": True}))
    assert body == {
        "inputs": ["a", "b"],
        "parameters": {
            "dtype": "float16",
            "truncate": True,
            "return_dense": False,
            "return_sparse": True,
            "return_colbert_vecs": True,
        },
    }
    assert plan_requests(["a"] * 5, c, {}, max_batch=2, max_payload_bytes=10_000) == [(0, 2), (2, 4), (4, 5)]


def test_tei_carries_dense_and_sparse_on_their_routes_and_never_colbert():
    dense, sparse = make_contract("tei").multi(("dense", "sparse"))
    assert (dense.route, sparse.route) == (None, "/embed_sparse")
    assert json.loads(sparse.encode(["a"], {"truncate": True})) == {"inputs": ["a"], "truncate": True}
    with pytest.raises(InputError, match="truncate and prompt_name only"):
        sparse.encode(["a"], {"dimensions": 4})
    with pytest.raises(ConfigError, match="cannot carry ColBERT"):
        make_contract("tei").multi(ALL)


@pytest.mark.parametrize("name", ["search_term", "openai"])
def test_dense_only_contracts_say_so_and_name_the_one_to_use(name):
    with pytest.raises(ConfigError, match=r"dense vectors only.*contract hf"):
        make_contract(name).multi(("sparse",))
    assert len(make_contract(name).multi(("dense",))) == 1


def test_npz_answers_decode_to_flagembedding_dicts_with_float32_weights():
    c = HFMultiContract(ALL)
    colbert = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    body = npz(
        dense=np.ones((2, 3), np.float32),
        sparse_ids=np.array([7, 1, 9], np.int32),
        sparse_weights=np.array([0.1, 0.2, 0.3], np.float32),
        sparse_offsets=np.array([0, 1, 3]),
        colbert=colbert,
        colbert_offsets=np.array([0, 2, 5]),
    )
    out = c.decode_response(WireResponse(200, body, {"content-type": "application/x-npz"}), 2, {})
    assert out["dense_vecs"].shape == (2, 3) and out["dense_vecs"].dtype == np.float32
    assert out["lexical_weights"] == [
        {"7": float(np.float32(0.1))},
        {"1": float(np.float32(0.2)), "9": float(np.float32(0.3))},
    ]
    assert [a.tolist() for a in out["colbert_vecs"]] == [colbert[:2].tolist(), colbert[2:].tolist()]
    with pytest.raises(ResponseFormatError, match="malformed npz answer"):
        c.decode_response(WireResponse(200, body, {"content-type": "application/x-npz"}), 3, {})


def test_json_answers_decode_the_same_and_wrong_counts_are_format_errors():
    c = HFMultiContract(("dense", "sparse", "colbert"))
    data = {
        "embeddings": [[0.5, 0.25]],
        "lexical_weights": [{"3": 0.1}],
        "colbert_vecs": [[[0.1, 0.2], [0.3, 0.4]]],
    }
    out = c.decode_response(
        WireResponse(200, json.dumps(data).encode(), {"content-type": "application/json"}), 1, {}
    )
    assert out["lexical_weights"] == [{"3": float(np.float32(0.1))}] and out["colbert_vecs"][0].shape == (
        2,
        2,
    )
    half = c.decode_response(WireResponse(200, json.dumps(data).encode(), {}), 1, {"dtype": "float16"})
    assert half["dense_vecs"].dtype == np.float16 and half["colbert_vecs"][0].dtype == np.float16
    with pytest.raises(ResponseFormatError, match="expected 2 embeddings"):
        c.decode_response(WireResponse(200, json.dumps(data).encode(), {}), 2, {})
    with pytest.raises(ResponseFormatError, match="BGE-M3 model"):
        HFMultiContract(("sparse",)).decode_response(WireResponse(200, b'{"embeddings": [[1]]}', {}), 1, {})


def test_tei_sparse_answers_decode_to_dicts():
    body = json.dumps([[{"index": 5, "value": 0.5}], []]).encode()
    out = TEISparseContract().decode_response(WireResponse(200, body, {}), 2, {})
    assert out["lexical_weights"] == [{"5": 0.5}, {}] and out["dense_vecs"] is None


def test_split_requests_merge_in_input_order():
    parts = [
        {
            "dense_vecs": np.zeros((2, 3), np.float32),
            "lexical_weights": [{"1": 1.0}, {}],
            "colbert_vecs": None,
        },
        {"dense_vecs": np.ones((1, 3), np.float32), "lexical_weights": [{"2": 2.0}], "colbert_vecs": None},
    ]
    out = merge_flags(parts, ("dense", "sparse"))
    assert out["dense_vecs"].tolist() == [[0] * 3, [0] * 3, [1] * 3]
    assert out["lexical_weights"] == [{"1": 1.0}, {}, {"2": 2.0}] and out["colbert_vecs"] is None


def test_base_url_finds_the_servers_other_routes_only_when_it_can():
    assert base_url("http://h:8080/", "/embed") == "http://h:8080"
    assert base_url("http://h:8080/embed", "/embed") == "http://h:8080"
    assert base_url("http://h/endpoints/e/invocations", "/embed") is None


def test_bad_outputs_and_dtypes_fail_before_any_request():
    with EmbeddingClient(endpoint_url="http://127.0.0.1:9") as c:
        with pytest.raises(InputError, match="outputs must name"):
            c.embed_multi(["a"], ("dense", "lexical"))
        with pytest.raises(InputError, match="dtype"):
            c.embed_multi(["a"], dtype="int8")
    with (
        EmbeddingClient(endpoint_url="http://127.0.0.1:9", contract="openai") as c,
        pytest.raises(ConfigError),
    ):
        c.embed_sparse(["a"])

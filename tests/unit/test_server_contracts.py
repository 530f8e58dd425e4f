"""Wire formats as pure functions: parsing, option checks, answers, and the error table."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from embedkit.engine import Tokenized
from embedkit.errors import (
    InputError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from embedkit.server.batcher import embed_merged, length_groups
from embedkit.server.contracts import Limits, hf, openai, search, tei
from embedkit.server.errors import UnauthorizedError, http_error, runtime_error

LIMITS = Limits(dimension=8, max_client_batch_size=4)


def test_hf_string_gives_one_vector_and_list_gives_rows():
    req = hf.parse({"inputs": "x"}, LIMITS)
    vecs = np.ones((1, 8), np.float32)
    assert req.single and hf.respond(req, vecs)["embeddings"].shape == (8,)
    req = hf.parse({"inputs": ["a", "b"], "parameters": {"normalize": False, "dimensions": 4}}, LIMITS)
    assert (req.texts, req.normalize, req.dimensions) == (["a", "b"], False, 4)
    assert hf.respond(req, np.ones((2, 4), np.float32))["embeddings"].shape == (2, 4)


def test_hf_truncation_alias_and_prompt_name():
    req = hf.parse({"inputs": "x", "parameters": {"truncation": False, "prompt_name": "query"}}, LIMITS)
    assert req.truncate is False and req.prompt_name == "query"


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"inputs": []}, "inputs is an empty list"),
        ({"inputs": ""}, "inputs is an empty string"),
        ({"inputs": 3}, "inputs must be a string or a list of strings, got int"),
        ({"inputs": None}, "got null"),
        ({"inputs": "x", "parameters": []}, "parameters must be an object"),
        ({"inputs": "x", "parameters": {"dimension": 3}}, r"unknown key\(s\) \['dimension'\]"),
        ({"inputs": "x", "parameters": {"dimensions": 9}}, "between 1 and 8"),
        ({"inputs": "x", "parameters": {"dimensions": True}}, "parameters.dimensions"),
        ({"inputs": "x", "parameters": {"dimensions": 2.5}}, "parameters.dimensions"),
        ({"inputs": "x", "parameters": {"normalize": "yes"}}, "parameters.normalize must be true or false"),
    ],
)
def test_hf_bad_payloads_name_the_field(payload, match):
    with pytest.raises(InputError, match=match):
        hf.parse(payload, LIMITS)


def test_more_inputs_than_the_client_batch_limit_is_413():
    with pytest.raises(PayloadTooLargeError, match="max_client_batch_size"):
        hf.parse({"inputs": ["a"] * 5}, LIMITS)


def test_search_term_answers_embedding_and_a_list_answers_embeddings():
    req = search.parse({"search_term": "geladeira"}, LIMITS)
    assert list(search.respond(req, np.ones((1, 8), np.float32))) == ["embedding"]
    req = search.parse({"search_term": ["a", "b"]}, LIMITS)
    assert list(search.respond(req, np.ones((2, 8), np.float32))) == ["embeddings"]
    with pytest.raises(InputError, match="search_term must be a string"):
        search.parse({"search_term": {"q": 1}}, LIMITS)


def test_tei_defaults_are_normalize_true_truncate_false():
    req = tei.parse({"inputs": "x"}, LIMITS)
    assert (req.normalize, req.truncate, req.single) == (True, False, True)
    assert tei.respond(req, np.ones((1, 8), np.float32)).shape == (1, 8)
    with pytest.raises(InputError, match="JSON object"):
        tei.parse(["x"], LIMITS)


def test_openai_base64_is_little_endian_float32():
    _req, fmt = openai.parse({"input": ["a", "b"], "encoding_format": "base64", "model": "m"}, LIMITS)
    vecs = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    out = openai.respond(vecs, fmt, "m", 7)
    assert out["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and out["object"] == "list"
    decoded = np.frombuffer(base64.b64decode(out["data"][1]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, vecs[1]) and out["data"][1]["index"] == 1


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"input": [1, 2, 3]}, "token ids"),
        ({"input": [[1, 2], [3]]}, "token ids"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "model": 3}, "model must be a string"),
        ({"input": ["x", 4]}, None),
    ],
)
def test_openai_bad_payloads(payload, match):
    if match is None:  # a mixed list is caught when the texts are validated (it names input[1] there)
        req, _ = openai.parse(payload, LIMITS)
        assert req.field == "input"
        return
    with pytest.raises(InputError, match=match):
        openai.parse(payload, LIMITS)


def test_dlc_exact_shapes_follow_the_transformers_pipeline():
    tokens = [np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)]
    single = hf.respond_dlc(hf.parse({"inputs": "x"}, LIMITS), tokens[:1])
    assert np.asarray(single).shape == (1, 3, 4)
    many = hf.respond_dlc(hf.parse({"inputs": ["x", "y"]}, LIMITS), tokens)
    assert len(many) == 2 and np.asarray(many[1]).shape == (1, 5, 4)


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InputError("bad"), 400),
        (UnauthorizedError("key"), 401),
        (PayloadTooLargeError("big"), 413),
        (UnsupportedMediaTypeError("type"), 415),
        (OverloadedError("busy", retry_after=2.2), 429),
        (NotReadyError("loading"), 503),
        (ValueError("secret detail /home/x/.ssh"), 500),
    ],
)
def test_error_table_maps_each_error_once(exc, status):
    code, body, headers = http_error(exc)
    assert code == status and set(body) == {"error", "error_type"}
    if status == 500:
        assert "secret" not in body["error"] and "Traceback" not in body["error"]
    if status == 429:
        assert headers["Retry-After"] == "3"


def test_errors_with_their_own_status_code_keep_it():
    class ToolkitError(Exception):
        status_code = 422

    code, body, _ = http_error(ToolkitError("custom message"))
    assert code == 422 and body["error"] == "custom message"


def test_dlc_error_body_is_the_official_container_shape():
    code, body, _ = http_error(InputError("bad inputs"), dlc=True)
    assert (code, body) == (400, {"code": 400, "type": "InternalServerException", "message": "bad inputs"})


def test_runtime_errors_take_the_shapes_boto3_parses():
    status, body, headers = runtime_error(
        400, b'{"error":"inputs[2] is empty","error_type":"Validation"}', {}
    )
    parsed = orjson.loads(body)
    assert status == 424 and headers["x-amzn-ErrorType"].startswith("ModelError:")
    assert parsed["OriginalStatusCode"] == 400 and "inputs[2]" in parsed["OriginalMessage"]
    status, body, headers = runtime_error(429, b'{"error":"busy"}', {"Retry-After": "1"})
    assert status == 429 and headers["x-amzn-ErrorType"].startswith("ThrottlingException:")
    assert headers["Retry-After"] == "1" and orjson.loads(body) == {"message": "busy"}


def test_length_groups_keep_short_texts_away_from_long_ones_and_respect_the_budget():
    lengths = np.array([12, 250, 10, 11, 240, 256, 9])
    groups = length_groups(lengths, 16384, 96)
    assert sorted(np.concatenate(groups).tolist()) == list(range(7))
    long_group = next(g for g in groups if 1 in g)
    assert set(long_group.tolist()) == {1, 4, 5}
    tight = length_groups(np.full(10, 100), 300, 0)
    assert all(len(g) * 100 <= 300 for g in tight)
    assert [g.tolist() for g in length_groups(np.array([5, 6]), 16384, 10_000)] == [[1, 0]]


def test_merged_requests_run_one_pass_per_length_group_and_come_back_in_request_order():
    class Engine:  # a vector per text that names it: [its length, its first token id]
        forward_cost_tokens = 96.0

        def __init__(self):
            self.passes = []

        def embed_tokenized(self, tok, normalize=None, dimensions=None):
            self.passes.append(sorted(int(n) for n in tok.lengths))
            return np.array(
                [[n, ids[0]] for n, ids in zip(tok.lengths, tok.ids, strict=True)], dtype=np.float32
            )

    lengths = np.array([12, 250, 10, 11, 240, 256, 9])
    tok = Tokenized(
        ids=[np.full(n, 100 + i, dtype=np.int32) for i, n in enumerate(lengths)],
        lengths=lengths,
        original_lengths=lengths,
        truncated=np.zeros(len(lengths), dtype=bool),
    )
    engine = Engine()
    out = embed_merged(engine, tok, 16384)
    assert out.tolist() == [[n, 100 + i] for i, n in enumerate(lengths)]
    assert sorted(engine.passes) == [[9, 10, 11, 12], [240, 250, 256]]  # length_groups' split at cost 96
    engine.forward_cost_tokens = 100_000.0  # a pass dearer than any padding: one pass for all
    engine.passes.clear()
    assert embed_merged(engine, tok, 16384).tolist() == out.tolist() and len(engine.passes) == 1

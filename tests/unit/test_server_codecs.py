"""Content types and Accept negotiation of /invocations, as pure functions."""

from __future__ import annotations

import io

import numpy as np
import orjson
import pytest

from embedkit.errors import InputError, NotAcceptableError, UnsupportedMediaTypeError
from embedkit.server import codecs


def test_json_is_the_default_when_content_type_is_absent_as_boto3_sends_it():
    assert codecs.decode(b'{"inputs": "x"}', None) == {"inputs": "x"}
    assert codecs.decode(b'{"inputs": "x"}', "Application/JSON; charset=utf-8") == {"inputs": "x"}


def test_curl_default_form_content_type_is_read_as_json_only_when_the_body_is_json():
    assert codecs.decode(b'{"search_term": "x"}', "application/x-www-form-urlencoded") == {"search_term": "x"}
    with pytest.raises(UnsupportedMediaTypeError):
        codecs.decode(b"a=1&b=2", "application/x-www-form-urlencoded")


@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", "image/png", "application/x-npy"])
def test_unsupported_content_types_are_415(ctype):
    with pytest.raises(UnsupportedMediaTypeError, match="not supported"):
        codecs.decode(b"hello", ctype)


@pytest.mark.parametrize(
    "body",
    [b"", b"   ", b"{", b'{"inputs": }', b"\xff\xfe\x00", b"[" * 5000 + b"]" * 5000, b'"\\ud800"'],
)
def test_bad_json_is_a_400_never_an_exception_of_another_kind(body):
    with pytest.raises(InputError):
        codecs.decode(body, "application/json")


def test_csv_is_one_text_per_line_with_commas_kept_and_quotes_honoured():
    body = b'first text\nsecond, with a comma\n"quoted, ""inner"" text"\n\n'
    texts = ["first text", "second, with a comma", 'quoted, "inner" text']
    assert codecs.decode(body, "text/csv") == {"inputs": texts}
    with pytest.raises(InputError, match="no text"):
        codecs.decode(b"\n\n", "text/csv")
    with pytest.raises(InputError, match="UTF-8"):
        codecs.decode(b"caf\xe9\n", "text/csv")


def test_jsonlines_accepts_strings_and_objects_and_names_the_bad_line():
    body = b'"plain"\n{"inputs": "obj"}\n\n{"text": "t"}\n'
    assert codecs.decode(body, "application/jsonlines") == {"inputs": ["plain", "obj", "t"]}
    with pytest.raises(InputError, match="line 2"):
        codecs.decode(b'"ok"\n{"inputs": 3}\n', "application/jsonlines")
    with pytest.raises(InputError, match="line 1 is not valid JSON"):
        codecs.decode(b"{nope\n", "application/x-ndjson")
    for batch_transform in ("application/json-lines", "application/x-jsonlines", "Application/JSONLines"):
        assert codecs.decode(b'{"inputs": "a"}\n"b"\n', batch_transform) == {"inputs": ["a", "b"]}
        assert codecs.line_format(batch_transform) == codecs.JSONLINES


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "application/json"),
        ("", "application/json"),
        ("*/*", "application/json"),
        ("application/x-npy", "application/x-npy"),
        ("text/csv;q=0.5, application/x-npy", "application/x-npy"),
        ("application/x-npy;q=0.1, text/csv;q=0.9", "text/csv"),
        ("image/png, application/*;q=0.2", "application/json"),
        ("application/jsonlines", "application/jsonlines"),
    ],
)
def test_accept_negotiation_honours_q_values(accept, expected):
    assert codecs.negotiate(accept) == expected


@pytest.mark.parametrize("accept", ["image/png", "application/xml, text/html", "application/json;q=0"])
def test_unproducible_accept_is_406_listing_what_is_possible(accept):
    with pytest.raises(NotAcceptableError, match="application/x-npy"):
        codecs.negotiate(accept)


def test_encoders_carry_float32_exactly():
    vecs = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    as_json = orjson.loads(codecs.encode({"embeddings": vecs}, codecs.JSON))["embeddings"]
    assert np.array_equal(np.asarray(as_json, dtype=np.float32), vecs)
    npy = np.load(io.BytesIO(codecs.encode({"embeddings": vecs}, codecs.NPY)), allow_pickle=False)
    assert npy.dtype == np.float32 and np.array_equal(npy, vecs)
    rows = codecs.encode({"embeddings": vecs}, codecs.CSV).decode().splitlines()
    assert np.array_equal(np.asarray([r.split(",") for r in rows], dtype=np.float32), vecs)
    lines = codecs.encode({"embeddings": vecs}, codecs.JSONLINES).splitlines()
    assert np.array_equal(np.asarray([orjson.loads(x)["embedding"] for x in lines], dtype=np.float32), vecs)


def test_a_single_vector_is_one_csv_row():
    vec = np.arange(4, dtype=np.float32)
    assert codecs.encode({"embedding": vec}, codecs.CSV) == b"0.0,1.0,2.0,3.0\n"

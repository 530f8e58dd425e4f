"""Client pieces without a network: settings, splitting, contracts, retry policy, error mapping."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from embedkit.client import ClientSettings, EndpointError, EndpointUnavailableError, ResponseFormatError
from embedkit.client.contracts import make_contract, plan_requests
from embedkit.client.retry import (
    RetryPolicy,
    TransportFailure,
    WireResponse,
    parse_retry_after,
    server_message,
)
from embedkit.client.transports import _client_error_response, resolve_url
from embedkit.errors import ConfigError, EmbedkitError, InputError


def test_settings_read_environment_with_types():
    s = ClientSettings.from_env(
        {
            "EMBEDKIT_SAGEMAKER_ENDPOINT": "prod-embeddings",
            "AWS_REGION": "sa-east-1",
            "EMBEDKIT_MAX_BATCH": "16",
            "EMBEDKIT_REQUEST_TIMEOUT": "2.5",
            "EMBEDKIT_SEARCH_TERM_BATCH": "yes",
            "EMBEDKIT_API_KEY": "secret",
        }
    ).validate()
    assert s.transport == "sagemaker" and s.region == "sa-east-1"
    assert s.max_batch == 16 and s.request_timeout == 2.5 and s.search_term_batch is True
    assert "secret" not in str(s) and "sa-east-1" in s.target()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "No endpoint configured"),
        ({"EMBEDKIT_ENDPOINT_URL": "http://a", "EMBEDKIT_SAGEMAKER_ENDPOINT": "b"}, "not both"),
        ({"EMBEDKIT_ENDPOINT_URL": "localhost:8080"}, "http://"),
        ({"EMBEDKIT_ENDPOINT_URL": "http://a", "EMBEDKIT_CONTRACT": "grpc"}, "contract must be one of"),
        ({"EMBEDKIT_SAGEMAKER_ENDPOINT": "b", "EMBEDKIT_CONTRACT": "openai"}, "openai"),
        ({"EMBEDKIT_ENDPOINT_URL": "http://a", "EMBEDKIT_MAX_BATCH": "0"}, "max_batch"),
        ({"EMBEDKIT_ENDPOINT_URL": "http://a", "EMBEDKIT_MAX_BATCH": "lots"}, "integer"),
        ({"EMBEDKIT_ENDPOINT_URL": "http://a", "EMBEDKIT_RETRY_DEADLINE": "-1"}, "retry_deadline"),
    ],
)
def test_impossible_settings_are_config_errors(env, message):
    with pytest.raises(ConfigError, match=message):
        ClientSettings.from_env(env).validate()


def test_resolve_url_appends_the_contract_path_only_to_bare_base_urls():
    assert resolve_url("http://h:8080/", "/invocations") == "http://h:8080/invocations"
    assert resolve_url("http://h:8080", "/v1/embeddings") == "http://h:8080/v1/embeddings"
    assert resolve_url("https://api.example/v1", "/v1/embeddings") == "https://api.example/v1/embeddings"
    assert (
        resolve_url("http://h/endpoints/e/invocations", "/invocations") == "http://h/endpoints/e/invocations"
    )


def test_plan_requests_respects_count_and_bytes_and_order():
    hf = make_contract("hf")
    texts = [f"text-{i:03d}" for i in range(100)]
    ranges = plan_requests(texts, hf, {}, max_batch=7, max_payload_bytes=10_000)
    assert ranges[0] == (0, 7) and ranges[-1] == (98, 100)
    assert [t for s, e in ranges for t in texts[s:e]] == texts
    ranges = plan_requests(texts, hf, {}, max_batch=1000, max_payload_bytes=200)
    assert all(len(hf.encode(texts[s:e], {})) <= 200 for s, e in ranges)
    assert [t for s, e in ranges for t in texts[s:e]] == texts and len(ranges) > 1


def test_plan_requests_counts_utf8_bytes_and_escapes():
    hf = make_contract("hf")
    texts = ["日本語のテキスト" * 20, 'quote " and \\ backslash' * 10, "emoji 🙂" * 30]
    for limit in (700, 1200, 5000):
        ranges = plan_requests(texts, hf, {"normalize": True}, max_batch=10, max_payload_bytes=limit)
        assert all(len(hf.encode(texts[s:e], {"normalize": True})) <= limit for s, e in ranges)


def test_plan_requests_names_a_text_too_large_alone():
    with pytest.raises(InputError, match=r"texts\[2\].*EMBEDKIT_MAX_PAYLOAD_BYTES") as info:
        plan_requests(
            ["a", "b", "c" * 500, "d"], make_contract("hf"), {}, max_batch=10, max_payload_bytes=300
        )
    assert info.value.context["index"] == 2


def test_search_term_without_lists_sends_one_text_per_request():
    st = make_contract("search_term")
    assert plan_requests(["a", "b", "c"], st, {}, max_batch=32, max_payload_bytes=1000) == [
        (0, 1),
        (1, 2),
        (2, 3),
    ]
    assert json.loads(st.encode(["a"], {})) == {"search_term": "a"}
    assert st.decode(b'{"embedding": [1, 2]}', 1).tolist() == [[1.0, 2.0]]
    with pytest.raises(InputError, match="no options"):
        st.encode(["a"], {"dimensions": 8})
    st_lists = make_contract("search_term", search_term_batch=True)
    assert json.loads(st_lists.encode(["a", "b"], {})) == {"search_term": ["a", "b"]}
    assert st_lists.decode(b'{"embeddings": [[1], [2]]}', 2).tolist() == [[1.0], [2.0]]


def test_hf_contract_sends_options_as_parameters_and_reads_bare_lists():
    hf = make_contract("hf")
    assert json.loads(hf.encode(["a"], {"dimensions": 4})) == {
        "inputs": ["a"],
        "parameters": {"dimensions": 4},
    }
    assert hf.decode(b"[[0.5, 1]]", 1).dtype == np.float32  # TEI-style bare list
    with pytest.raises(ResponseFormatError, match="no 'embeddings' field"):
        hf.decode(b'{"embedding": [1]}', 1)
    with pytest.raises(ResponseFormatError, match="different lengths"):
        hf.decode(b'{"embeddings": [[1, 2], [1]]}', 2)


def test_token_level_answers_are_pooled_by_the_chosen_pooling():
    tokens = [[[[1.0, 0.0], [3.0, 0.0]]], [[[0.0, 2.0], [0.0, 4.0], [0.0, 0.0]]]]  # (1, tokens, dim) each
    body = json.dumps(tokens).encode()
    mean = make_contract("hf").decode(body, 2)
    np.testing.assert_allclose(mean, [[1.0, 0.0], [0.0, 1.0]])
    raw = make_contract("hf").decode(body, 2, {"normalize": False})
    np.testing.assert_allclose(raw, [[2.0, 0.0], [0.0, 2.0]])
    cls = make_contract("hf", token_pooling="cls").decode(body, 2, {"normalize": False})
    np.testing.assert_allclose(cls, [[1.0, 0.0], [0.0, 2.0]])


def test_openai_contract_reads_float_and_base64_in_index_order():
    oa = make_contract("openai", openai_model="bge")
    assert json.loads(oa.encode(["a"], {"dimensions": 2}))["dimensions"] == 2
    assert json.loads(oa.encode(["a"], {}))["model"] == "bge"
    b64 = base64.b64encode(np.array([3, 4], dtype="<f4").tobytes()).decode()
    body = {"data": [{"index": 1, "embedding": b64}, {"index": 0, "embedding": [1, 2]}]}
    assert oa.decode(json.dumps(body).encode(), 2).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(InputError, match="dimensions"):
        oa.encode(["a"], {"normalize": True})


def test_backoff_grows_is_capped_and_jittered():
    p = RetryPolicy(backoff=0.1, backoff_max=1.0)
    for retry, (lo, hi) in {1: (0.05, 0.1), 2: (0.1, 0.2), 3: (0.2, 0.4), 10: (0.5, 1.0)}.items():
        delays = [p.backoff_delay(retry) for _ in range(50)]
        assert all(lo <= d <= hi for d in delays)
        assert len(set(delays)) > 1


def test_retry_after_is_parsed_and_honoured():
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    attempts = RetryPolicy(backoff=0.01, deadline=60).start("http://x", "texts[0]")
    attempts.timeout()
    assert attempts.failed(WireResponse(429, b"", {"retry-after": "7"})) >= 7.0


def test_attempts_turn_failures_into_typed_errors():
    policy = RetryPolicy(max_retries=1, backoff=0.0, deadline=60)
    a = policy.start("http://x", "texts[0]")
    a.timeout()
    with pytest.raises(EndpointError) as info:
        a.failed(WireResponse(413, b'{"error": "body too large", "error_type": "PayloadTooLarge"}'))
    assert info.value.status == 413 and info.value.server_error_type == "PayloadTooLarge"
    a = policy.start("http://x", "texts[0]")
    a.timeout()
    assert a.failed(failure=TransportFailure("refused")) >= 0
    a.timeout()
    with pytest.raises(EndpointUnavailableError, match="after 2 attempts") as info:
        a.failed(WireResponse(503, b"loading"))
    assert isinstance(info.value, EmbedkitError) and info.value.server_message == "loading"


@pytest.mark.parametrize(
    ("body", "message", "kind"),
    [
        (b'{"error": "inputs[1] is empty", "error_type": "Validation"}', "inputs[1] is empty", "Validation"),
        (
            b'{"code": 400, "type": "InternalServerException", "message": "bad"}',
            "bad",
            "InternalServerException",
        ),
        (
            b'{"error": {"message": "too long", "type": "invalid_request_error"}}',
            "too long",
            "invalid_request_error",
        ),
        (b"plain text failure", "plain text failure", None),
        (b"", "(empty body)", None),
    ],
)
def test_server_messages_are_read_from_common_error_bodies(body, message, kind):
    assert server_message(body) == (message, kind)


def test_sagemaker_errors_map_to_the_models_status():
    model_error = {
        "Error": {"Code": "ModelError", "Message": "Received client error (400) ..."},
        "OriginalStatusCode": 400,
        "OriginalMessage": '{"error": "inputs[0] is empty", "error_type": "Validation"}',
        "ResponseMetadata": {"HTTPStatusCode": 424, "HTTPHeaders": {}},
    }
    r = _client_error_response(model_error)
    assert (r.status, r.origin) == (400, "ModelError") and server_message(r.body)[0] == "inputs[0] is empty"
    throttled = {
        "Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
        "ResponseMetadata": {"HTTPStatusCode": 400, "HTTPHeaders": {"retry-after": "1"}},
    }
    r = _client_error_response(throttled)
    assert (
        r.status == 429 and r.headers == {"retry-after": "1"} and server_message(r.body)[0] == "Rate exceeded"
    )

"""The client against a real misbehaving server: splitting, retries, deadlines and typed errors.

The server (tests/integration/fake_endpoint.py) is a real uvicorn on a random loopback port that
answers 429/503/timeouts/4xx/5xx on cue; nothing in the client is mocked.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

from embedkit.cli import main
from embedkit.client import (
    AsyncEmbeddingClient,
    EmbeddingClient,
    EndpointError,
    EndpointUnavailableError,
    ResponseFormatError,
)
from embedkit.errors import ConfigError, InputError
from tests.conftest import free_port
from tests.integration.fake_endpoint import DIM, FakeEndpoint, RunningServer, build_app, fake_vector

FAST = {"retry_backoff": 0.01, "retry_backoff_max": 0.05, "retry_deadline": 30.0}
TEXTS = [f"text number {i} about cats" for i in range(10)]


@pytest.fixture(scope="module")
def endpoint():
    ep = FakeEndpoint()
    with RunningServer(build_app(ep)) as server:
        ep.url = server.url
        yield ep


@pytest.fixture
def ep(endpoint, monkeypatch):
    for name in ("EMBEDKIT_ENDPOINT_URL", "EMBEDKIT_SAGEMAKER_ENDPOINT", "EMBEDKIT_CONTRACT"):
        monkeypatch.delenv(name, raising=False)
    endpoint.reset()
    return endpoint


def expected(texts):
    return np.stack([fake_vector(t) for t in texts])


def client(ep, **kw) -> EmbeddingClient:
    return EmbeddingClient(endpoint_url=ep.url, **{**FAST, **kw})


def test_embed_returns_float32_rows_in_input_order(ep):
    with client(ep) as c:
        vecs = c.embed(TEXTS)
        one = c.embed_one("a single text")
    assert vecs.dtype == np.float32 and vecs.shape == (len(TEXTS), DIM)
    np.testing.assert_array_equal(vecs, expected(TEXTS))
    assert one.shape == (DIM,)
    np.testing.assert_array_equal(one, fake_vector("a single text"))
    assert ep.calls[0].path == "/invocations" and ep.calls[0].headers["content-type"] == "application/json"


def test_transport_is_chosen_by_environment_only(ep, monkeypatch):
    monkeypatch.setenv("EMBEDKIT_ENDPOINT_URL", ep.url)
    with EmbeddingClient() as c:
        assert c.transport_name == "http" and c.target == ep.url + "/invocations"
        np.testing.assert_array_equal(c.embed(["x"]), expected(["x"]))


def test_split_by_input_count_keeps_order_under_concurrency(ep):
    texts = [f"t{i}" for i in range(23)]
    with client(ep, max_batch=5, concurrency=4) as c:
        vecs = c.embed(texts)
    np.testing.assert_array_equal(vecs, expected(texts))
    assert sorted(len(call.texts) for call in ep.calls) == [3, 5, 5, 5, 5]
    assert sorted(t for call in ep.calls for t in call.texts) == sorted(texts)


def test_one_client_shared_by_threads(ep):
    from concurrent.futures import ThreadPoolExecutor

    lists = [[f"thread {t} text {i}" for i in range(7)] for t in range(4)]
    with client(ep, max_batch=2, concurrency=2) as c, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(c.embed, lists))
        assert c.stats.requests == 16  # 4 threads x 4 requests of <= 2 texts
    for texts, vecs in zip(lists, results, strict=True):
        np.testing.assert_array_equal(vecs, expected(texts))


def test_split_by_payload_bytes_keeps_every_request_under_the_limit(ep):
    texts = [("é" * 300) + f" {i}" for i in range(12)]  # ~600 bytes each as UTF-8
    limit = 2_000
    with client(ep, max_payload_bytes=limit, max_batch=100) as c:
        vecs = c.embed(texts)
    np.testing.assert_array_equal(vecs, expected(texts))
    assert len(ep.calls) >= 4
    assert all(call.body_bytes <= limit for call in ep.calls)


def test_text_larger_than_the_payload_limit_is_an_input_error_naming_it(ep):
    with client(ep, max_payload_bytes=500) as c, pytest.raises(InputError, match=r"texts\[1\]"):
        c.embed(["short", "x" * 600])
    assert ep.calls == []


def test_bad_texts_are_rejected_before_any_request(ep):
    with client(ep) as c:
        with pytest.raises(InputError, match=r"texts\[2\] must be a string, got null"):
            c.embed(["a", "b", None])
        with pytest.raises(InputError, match="single string"):
            c.embed("not a list")
        assert c.embed([]).shape == (0, 0)
    assert ep.calls == []


def test_429_and_503_are_retried_until_success(ep):
    ep.fail(["429", "503", "429"])
    with client(ep) as c:
        vecs = c.embed(["retry me"])
        assert c.stats.retries == 3 and c.stats.requests == 4 and c.stats.failures == 0
    np.testing.assert_array_equal(vecs, expected(["retry me"]))
    assert len(ep.calls) == 4


def test_a_timed_out_attempt_is_retried(ep):
    ep.fail(["sleep"])
    with client(ep, request_timeout=0.3) as c:
        vecs = c.embed(["slow then fast"])
        assert c.stats.retries == 1
    np.testing.assert_array_equal(vecs, expected(["slow then fast"]))


def test_retries_stop_at_max_retries_with_a_typed_error(ep):
    ep.fail(["503"] * 10)
    with client(ep, max_retries=2) as c, pytest.raises(EndpointUnavailableError) as info:
        c.embed(["never"])
    err = info.value
    assert err.status == 503 and err.attempts == 3 and err.server_message == "model loading"
    assert err.server_error_type == "Unhealthy" and err.exit_code == 69
    assert len(ep.calls) == 3


def test_retry_after_beyond_the_deadline_gives_up_at_once(ep):
    ep.fail(["503-long"])  # Retry-After: 3600
    with (
        client(ep, retry_deadline=30) as c,
        pytest.raises(EndpointUnavailableError, match="deadline") as info,
    ):
        c.embed(["x"])
    assert info.value.attempts == 1 and len(ep.calls) == 1


def test_client_errors_are_not_retried_and_carry_the_server_message(ep):
    ep.fail(["400"])
    with client(ep) as c, pytest.raises(EndpointError) as info:
        c.embed(["a", "b"])
    err = info.value
    assert type(err) is EndpointError and err.status == 400 and len(ep.calls) == 1
    assert err.server_message == "inputs[0] is not allowed here" and err.server_error_type == "Validation"
    assert "texts[0:2]" in str(err) and ep.url in str(err)


def test_a_500_is_not_retried(ep):
    ep.fail(["500"])
    with client(ep) as c, pytest.raises(EndpointError) as info:
        c.embed(["a"])
    assert info.value.status == 500 and not isinstance(info.value, EndpointUnavailableError)
    assert len(ep.calls) == 1


def test_a_failed_chunk_fails_the_call_with_the_chunk_named(ep):
    ep.fail(["ok", "400"])
    with client(ep, max_batch=2, concurrency=1) as c, pytest.raises(EndpointError, match=r"texts\[2:4\]"):
        c.embed(["a", "b", "c", "d", "e"])


def test_unreadable_answers_raise_response_format_errors(ep):
    ep.fail(["garbage", "short"])
    with client(ep) as c:
        with pytest.raises(ResponseFormatError, match="not JSON"):
            c.embed(["a"])
        with pytest.raises(ResponseFormatError, match="expected 2 embeddings"):
            c.embed(["a", "b"])


def test_connection_refused_is_retried_then_unavailable(ep):
    url = f"http://127.0.0.1:{free_port()}"
    c = EmbeddingClient(endpoint_url=url, max_retries=2, **FAST)
    with c, pytest.raises(EndpointUnavailableError, match="gave no answer") as info:
        c.embed(["x"])
    assert info.value.status is None and info.value.attempts == 3


def test_search_term_contract_sends_one_text_per_request(ep):
    with client(ep, contract="search_term") as c:
        vecs = c.embed(["geladeira frost free", "fogão 4 bocas", "micro-ondas"])
    np.testing.assert_array_equal(vecs, expected(["geladeira frost free", "fogão 4 bocas", "micro-ondas"]))
    assert sorted(call.texts for call in ep.calls) == [
        ["fogão 4 bocas"],
        ["geladeira frost free"],
        ["micro-ondas"],
    ]
    ep.reset()
    with client(ep, contract="search_term", search_term_batch=True) as c:
        np.testing.assert_array_equal(c.embed(["a", "b"]), expected(["a", "b"]))
    assert len(ep.calls) == 1 and ep.calls[0].path == "/invocations[list]"


def test_openai_contract_posts_to_v1_embeddings_and_sorts_by_index(ep):
    with client(ep, contract="openai", openai_model="m") as c:
        vecs = c.embed(["a", "b", "c"], dimensions=8)
    np.testing.assert_array_equal(vecs, expected(["a", "b", "c"]))
    assert ep.calls[0].path == "/v1/embeddings"


def test_token_level_answers_are_pooled_and_normalised(ep):
    ep.token_level = True
    with client(ep) as c:
        vecs = c.embed(["a", "b"])
    want = expected(["a", "b"])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(vecs, want, rtol=1e-5, atol=1e-6)


def test_api_key_is_sent_as_bearer_token(ep):
    with client(ep, api_key="s3cret") as c:
        c.embed(["x"])
        assert "s3cret" not in str(c.settings)  # masked when printed
    assert ep.calls[0].headers["authorization"] == "Bearer s3cret"


def test_async_client_splits_retries_and_keeps_order(ep):
    texts = [f"async {i}" for i in range(9)]
    ep.fail(["429", "sleep"])

    async def go():
        async with AsyncEmbeddingClient(
            endpoint_url=ep.url, max_batch=2, concurrency=3, request_timeout=0.3, **FAST
        ) as c:
            vecs = await c.embed(texts)
            one = await c.embed_one("x")
            return vecs, one, c.stats.retries

    vecs, one, retries = asyncio.run(go())
    np.testing.assert_array_equal(vecs, expected(texts))
    np.testing.assert_array_equal(one, fake_vector("x"))
    assert retries == 2


def test_async_client_raises_typed_errors(ep):
    ep.fail(["400"])

    async def go():
        async with AsyncEmbeddingClient(endpoint_url=ep.url, **FAST) as c:
            await c.embed(["a"])

    with pytest.raises(EndpointError) as info:
        asyncio.run(go())
    assert info.value.status == 400


def test_both_or_no_transport_is_a_config_error(monkeypatch):
    monkeypatch.delenv("EMBEDKIT_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("EMBEDKIT_SAGEMAKER_ENDPOINT", raising=False)
    with pytest.raises(ConfigError, match="No endpoint configured"):
        EmbeddingClient()
    monkeypatch.setenv("EMBEDKIT_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("EMBEDKIT_SAGEMAKER_ENDPOINT", "prod")
    with pytest.raises(ConfigError, match="not both"):
        EmbeddingClient()


def test_http_transport_never_imports_boto3(ep):
    code = (
        "import sys; from embedkit.client import EmbeddingClient\n"
        f"c = EmbeddingClient(endpoint_url={ep.url!r}); v = c.embed(['x'])\n"
        "assert v.shape == (1, 8), v.shape\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'boto3 imported'\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": "/nonexistent"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_invoke_command_prints_vectors(ep, capsys):
    assert main(["invoke", "--endpoint-url", ep.url, "a cat", "a dog"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["transport"] == "http" and out["count"] == 2 and out["dimension"] == DIM
    np.testing.assert_allclose(np.array(out["embeddings"], dtype=np.float32), expected(["a cat", "a dog"]))


def test_invoke_command_exit_codes(ep, capsys, monkeypatch):
    ep.fail(["400"])
    assert main(["invoke", "--endpoint-url", ep.url, "x"]) == 1
    assert "inputs[0] is not allowed here" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}"
    assert (
        main(["invoke", "--endpoint-url", dead, "--max-retries", "1", "--retry-backoff", "0.01", "x"]) == 69
    )
    assert main(["invoke", "x"]) == 2
    assert "No endpoint configured" in capsys.readouterr().err

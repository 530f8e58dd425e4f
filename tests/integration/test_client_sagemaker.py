"""The SageMaker transport: boto3's sagemaker-runtime client pointed at a real server's runtime
surface (``POST /endpoints/{name}/invocations``), with SageMaker-shaped errors injected on cue."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from embedkit.client import AsyncEmbeddingClient, EmbeddingClient, EndpointError, EndpointUnavailableError
from embedkit.errors import ConfigError
from tests.integration.fake_endpoint import FakeEndpoint, RunningServer, build_app, fake_vector

FAST = {"retry_backoff": 0.01, "retry_backoff_max": 0.05, "retry_deadline": 30.0}


@pytest.fixture(scope="module")
def endpoint():
    ep = FakeEndpoint(endpoint_name="alex-embedding-endpoint")
    with RunningServer(build_app(ep)) as server:
        ep.url = server.url
        yield ep


@pytest.fixture
def ep(endpoint, monkeypatch):
    monkeypatch.delenv("EMBEDKIT_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("EMBEDKIT_SAGEMAKER_ENDPOINT", endpoint.endpoint_name)
    monkeypatch.setenv("EMBEDKIT_SAGEMAKER_ENDPOINT_URL", endpoint.url)
    endpoint.reset()
    return endpoint


def expected(texts):
    return np.stack([fake_vector(t) for t in texts])


def test_sagemaker_transport_is_chosen_by_environment_and_embeds(ep):
    texts = [f"s{i}" for i in range(7)]
    with EmbeddingClient(max_batch=3, **FAST) as c:
        assert c.transport_name == "sagemaker"
        assert "alex-embedding-endpoint" in c.target
        vecs = c.embed(texts)
    np.testing.assert_array_equal(vecs, expected(texts))
    assert [len(call.texts) for call in ep.calls] and all(call.path == "/runtime" for call in ep.calls)
    assert sum(len(call.texts) for call in ep.calls) == 7
    assert ep.calls[0].headers["content-type"] == "application/json"
    assert ep.calls[0].headers["authorization"].startswith("AWS4-HMAC-SHA256")  # signed by boto3


def test_model_error_carries_the_containers_status_and_message(ep):
    ep.fail(["400"])
    with EmbeddingClient(**FAST) as c, pytest.raises(EndpointError) as info:
        c.embed(["x"])
    err = info.value
    assert type(err) is EndpointError and err.status == 400 and len(ep.calls) == 1
    assert err.server_message == "inputs[0] is not allowed here" and "ModelError" in str(err)


def test_model_errors_saying_busy_and_throttling_are_retried(ep):
    ep.fail(["503", "throttle", "429"])
    with EmbeddingClient(**FAST) as c:
        vecs = c.embed(["busy"])
        assert c.stats.retries == 3
    np.testing.assert_array_equal(vecs, expected(["busy"]))


def test_retries_exhausted_on_throttling(ep):
    ep.fail(["throttle"] * 5)
    with EmbeddingClient(max_retries=1, **FAST) as c, pytest.raises(EndpointUnavailableError) as info:
        c.embed(["x"])
    assert info.value.status == 429 and info.value.attempts == 2
    assert "ThrottlingException" in str(info.value)


def test_unknown_endpoint_name_is_a_validation_error(ep, monkeypatch):
    monkeypatch.setenv("EMBEDKIT_SAGEMAKER_ENDPOINT", "no-such-endpoint")
    with EmbeddingClient(**FAST) as c, pytest.raises(EndpointError) as info:
        c.embed(["x"])
    assert info.value.status == 400 and "not found" in info.value.server_message


def test_a_slow_model_times_out_and_is_retried(ep):
    ep.fail(["sleep"])
    with EmbeddingClient(request_timeout=0.5, **FAST) as c:
        np.testing.assert_array_equal(c.embed(["slow"]), expected(["slow"]))
        assert c.stats.retries == 1


def test_async_client_over_sagemaker(ep):
    texts = [f"a{i}" for i in range(5)]

    async def go():
        async with AsyncEmbeddingClient(max_batch=2, **FAST) as c:
            return await c.embed(texts)

    np.testing.assert_array_equal(asyncio.run(go()), expected(texts))


def test_openai_contract_over_sagemaker_is_a_config_error(ep):
    with pytest.raises(ConfigError, match="openai"):
        EmbeddingClient(contract="openai")


def test_missing_region_is_a_config_error(ep, monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "EMBEDKIT_REGION", "SAGEMAKER_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(ConfigError, match="region"):
        EmbeddingClient(**FAST)

"""A non-default server: API key, named endpoint, small limits and the HF DLC exact (token-level) mode."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.contract.serving import ServerProcess, local_runtime_client

pytestmark = pytest.mark.slow  # ~40 s: configured server processes on 2 cores

KEY = "s3cret-test-key"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    env = {"EMBEDKIT_API_KEY": KEY, "EMBEDKIT_ENDPOINT_NAME": "alex-embedding-endpoint,other"}
    args = ["--model", str(tiny_model), "--hf-mode", "dlc-exact", "--max-body-bytes", "2000"]
    args += ["--max-client-batch-size", "4"]
    srv = ServerProcess(args, env=env, log_dir=tmp_path_factory.mktemp("serve-configured"))
    with srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def test_api_key_guards_every_route_but_ping_and_the_secret_is_masked_in_the_log(server, http):
    assert httpx.get(server.url + "/ping").status_code == 200
    r = httpx.post(server.url + "/embed", json={"inputs": "x"})
    assert r.status_code == 401 and r.json()["error_type"] == "Unauthorized"
    r = httpx.post(
        server.url + "/invocations", json={"inputs": "x"}
    )  # dlc-exact: the container's error shape
    assert r.status_code == 401 and r.json()["code"] == 401
    wrong = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    # the query routes check the key before reading the body (a refused body is drained) and
    # take it as a bearer token of any case or as X-Api-Key
    for headers, status in (
        ({"Authorization": "Bearer nope"}, 401),
        ({"Authorization": f"bearer {KEY}"}, 200),
        ({"X-Api-Key": KEY}, 200),
        ({"Authorization": "Basic abc", "X-Api-Key": KEY}, 200),
    ):
        assert httpx.post(server.url + "/embed", json={"inputs": "x"}, headers=headers).status_code == status
    assert http.get("/metrics").status_code == 200
    assert KEY not in server.log() and '"api_key": "***"' in server.log()


def test_dlc_exact_mode_returns_token_level_vectors_like_the_official_container(http, tiny_embedder):
    texts = ["the cat", "the cat sat on the mat"]
    tokens = tiny_embedder.token_embeddings(texts)
    one = http.post("/invocations", json={"inputs": texts[0]}).json()
    assert np.asarray(one).shape == (1, len(tokens[0]), 32)
    assert np.allclose(np.asarray(one[0], np.float32), tokens[0], atol=1e-6)
    many = http.post("/invocations", json={"inputs": texts}).json()
    assert [np.asarray(m).shape for m in many] == [(1, len(t), 32) for t in tokens]
    bad = http.post("/invocations", json={"inputs": []})
    assert bad.status_code == 400
    assert set(bad.json()) == {"code", "type", "message"} and bad.json()["type"] == "InternalServerException"


def test_small_limits_give_413(http):
    r = http.post("/invocations", content=json.dumps({"inputs": "x" * 3000}).encode())
    assert r.status_code == 413 and "2000 bytes" in r.json()["message"]
    r = http.post("/embed", json={"inputs": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 413 and "max_client_batch_size (4)" in r.json()["error"]


def test_runtime_surface_knows_its_endpoint_names(server):
    client = local_runtime_client(server.url, api_key=KEY)
    ok = client.invoke_endpoint(EndpointName="other", Body=json.dumps({"inputs": "hi"}))
    assert np.asarray(json.loads(ok["Body"].read())).shape[0] == 1
    with pytest.raises(client.exceptions.ValidationError, match="Endpoint missing of account"):
        client.invoke_endpoint(EndpointName="missing", Body=json.dumps({"inputs": "hi"}))


def test_runtime_surface_without_the_key_is_access_denied(server):
    client = local_runtime_client(server.url)
    with pytest.raises(client.exceptions.ClientError) as err:
        client.invoke_endpoint(EndpointName="other", Body=b'{"inputs": "hi"}')
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

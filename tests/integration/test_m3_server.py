"""BGE-M3's three outputs through `embedkit serve` on a real uvicorn (loopback, in this process) and
through the client: /embed_sparse, /invocations parameters (container and runtime surfaces), npz /
npy / float16 answers, the response-size limit, a model without the heads, and merged batches, all
compared with the engine's ``embed_multi`` on the same tiny model."""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn

from embedkit.client import EmbeddingClient, EndpointError
from embedkit.server import ServerSettings, create_app
from embedkit.settings import EngineSettings
from tests.conftest import free_port
from tests.contract.serving import local_runtime_client

pytestmark = pytest.mark.slow  # ~20 s: three model loads behind real uvicorn servers on 2 cores

TEXTS = ["the cat sat on the mat", "a dog ran in the park and the park was green", "hello"]
ALL = {"return_sparse": True, "return_colbert_vecs": True}
NPZ = "application/x-npz"
FAST = {"retry_backoff": 0.01, "retry_backoff_max": 0.05, "retry_deadline": 30.0}


class LocalServer:
    """``create_app`` under uvicorn on a thread (lifespan on: the model loads as in ``serve``)."""

    def __init__(self, model, **server) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        engine = EngineSettings(model=str(model), device="cpu", backend="torch")
        app = create_app(engine, ServerSettings(port=self.port, **server))
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"m3-serve-{self.port}")

    def __enter__(self) -> LocalServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.thread.is_alive():
            try:
                if httpx.get(self.url + "/ping", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"the server on {self.url} did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine(small_m3):
    from embedkit import Embedder

    return Embedder(str(small_m3), device="cpu", backend="torch")


@pytest.fixture(scope="module")
def ref(engine):
    return engine.embed_multi(TEXTS)


@pytest.fixture(scope="module")
def server(small_m3):
    with LocalServer(small_m3) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def assert_dense(got, want, *, half: bool = False) -> None:
    got = np.asarray(got, dtype=np.float32)
    assert got.shape == want.shape
    tol = dict(rtol=2.0**-11, atol=1e-6) if half else dict(rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, want, **tol)


def assert_sparse(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w)  # the same token ids, in the same (first-occurrence) order
        np.testing.assert_allclose(list(g.values()), list(w.values()), rtol=0, atol=1e-6)


def assert_colbert(got, want, *, half: bool = False) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert_dense(g, w, half=half)


# ------------------------------------------------------------------------------ TEI /embed_sparse
def test_embed_sparse_is_teis_shape_with_the_engines_weights(http, ref):
    r = http.post("/embed_sparse", json={"inputs": TEXTS})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    got = [{str(e["index"]): e["value"] for e in item} for item in r.json()]
    assert_sparse(got, ref.lexical_weights())
    one = http.post("/embed_sparse", json={"inputs": TEXTS[0]}).json()
    assert len(one) == 1 and [e["index"] for e in one[0]] == [int(k) for k in ref.lexical_weights()[0]]


# ------------------------------------------------------------------------ /invocations parameters
def test_invocations_parameters_add_lexical_weights_and_colbert_vecs_beside_embeddings(http, ref):
    body = http.post("/invocations", json={"inputs": TEXTS, "parameters": ALL}).json()
    assert list(body) == ["embeddings", "lexical_weights", "colbert_vecs"]
    assert_dense(body["embeddings"], ref.dense)
    assert_sparse(body["lexical_weights"], ref.lexical_weights())
    assert_colbert(body["colbert_vecs"], ref.colbert)
    single = http.post("/invocations", json={"inputs": TEXTS[1], "parameters": ALL}).json()
    assert_dense(single["embeddings"], ref.dense[1])
    assert_sparse([single["lexical_weights"]], ref.lexical_weights()[1:2])
    assert_colbert([single["colbert_vecs"]], ref.colbert[1:2])
    sparse_only = {"return_dense": False, "return_sparse": True}
    search = http.post("/invocations", json={"search_term": TEXTS[0], "parameters": sparse_only}).json()
    assert list(search) == ["lexical_weights"]
    assert_sparse([search["lexical_weights"]], ref.lexical_weights()[:1])


def test_requests_without_the_parameters_answer_exactly_as_before(http, ref):
    assert list(http.post("/invocations", json={"inputs": TEXTS}).json()) == ["embeddings"]
    assert list(http.post("/invocations", json={"search_term": "hello"}).json()) == ["embedding"]
    r = http.post("/invocations", json={"inputs": TEXTS}, headers={"Accept": "application/x-npy"})
    assert_dense(np.load(io.BytesIO(r.content)), ref.dense)
    assert np.asarray(http.post("/embed", json={"inputs": TEXTS}).json()).shape == ref.dense.shape


def test_npz_answer_decodes_with_np_load_and_np_split(http, ref):
    r = http.post("/invocations", json={"inputs": TEXTS, "parameters": ALL}, headers={"Accept": NPZ})
    assert r.status_code == 200 and r.headers["content-type"] == NPZ
    z = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert_dense(z["dense"], ref.dense)
    colbert = np.split(z["colbert"], z["colbert_offsets"][1:-1])
    assert_colbert(colbert, ref.colbert)
    cuts = z["sparse_offsets"][1:-1]
    lexical = [
        dict(zip(map(str, i.tolist()), w.tolist(), strict=True))
        for i, w in zip(np.split(z["sparse_ids"], cuts), np.split(z["sparse_weights"], cuts), strict=True)
    ]
    assert_sparse(lexical, ref.lexical_weights())


def test_float16_halves_the_vectors_and_npy_carries_one_inputs_colbert_vecs(http, ref):
    params = {**ALL, "dtype": "float16"}
    full = http.post("/invocations", json={"inputs": TEXTS, "parameters": ALL}, headers={"Accept": NPZ})
    half = http.post("/invocations", json={"inputs": TEXTS, "parameters": params}, headers={"Accept": NPZ})
    z = np.load(io.BytesIO(half.content))
    assert z["dense"].dtype == np.float16 and z["colbert"].dtype == np.float16
    assert z["sparse_weights"].dtype == np.float32  # lexical weights stay float32
    assert len(half.content) < 0.7 * len(full.content)
    assert_dense(z["dense"], ref.dense, half=True)
    assert_colbert(np.split(z["colbert"], z["colbert_offsets"][1:-1]), ref.colbert, half=True)
    as_json = http.post("/invocations", json={"inputs": TEXTS, "parameters": params}).json()
    assert_colbert(as_json["colbert_vecs"], ref.colbert, half=True)
    body = {
        "inputs": TEXTS[1],
        "parameters": {"return_dense": False, "return_colbert_vecs": True, "dtype": "float16"},
    }
    r = http.post("/invocations", json=body, headers={"Accept": "application/x-npy"})
    arr = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert arr.dtype == np.float16 and arr.shape == ref.colbert[1].shape
    assert_dense(arr, ref.colbert[1], half=True)
    r = http.post(
        "/invocations", json={"inputs": TEXTS, "parameters": ALL}, headers={"Accept": "application/x-npy"}
    )
    assert r.status_code == 406 and "application/x-npz" in r.json()["error"]


def test_the_runtime_surface_takes_the_parameters_as_boto3_sends_them(server, ref):
    client = local_runtime_client(server.url)
    out = client.invoke_endpoint(
        EndpointName="alex-embedding-endpoint",
        ContentType="application/json",
        Accept=NPZ,
        Body=json.dumps({"inputs": TEXTS, "parameters": ALL}),
    )
    assert out["ContentType"] == NPZ
    z = np.load(io.BytesIO(out["Body"].read()))
    assert_dense(z["dense"], ref.dense)
    assert_colbert(np.split(z["colbert"], z["colbert_offsets"][1:-1]), ref.colbert)
    out = client.invoke_endpoint(
        EndpointName="x",
        ContentType="application/json",
        Body=json.dumps({"inputs": TEXTS, "parameters": ALL}),
    )
    assert_sparse(json.loads(out["Body"].read())["lexical_weights"], ref.lexical_weights())


def test_merged_requests_mixing_dense_and_m3_each_get_their_own_answer(http, engine, ref):
    dense = engine.encode(TEXTS)

    def call(i: int):
        if i % 2:
            return "m3", http.post("/invocations", json={"inputs": TEXTS, "parameters": ALL}).json()
        return "dense", http.post("/invocations", json={"inputs": TEXTS}).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(24)))
    for kind, body in answers:
        assert_dense(body["embeddings"], dense if kind == "dense" else ref.dense)
        if kind == "m3":
            assert_sparse(body["lexical_weights"], ref.lexical_weights())
            assert_colbert(body["colbert_vecs"], ref.colbert)
        else:
            assert list(body) == ["embeddings"]


def test_openai_route_stays_dense_and_refuses_m3_parameters(http, ref):
    r = http.post("/v1/embeddings", json={"input": TEXTS, "return_sparse": True})
    assert r.status_code == 400 and "/embed_sparse" in r.json()["error"]
    data = http.post("/v1/embeddings", json={"input": TEXTS}).json()["data"]
    assert_dense([d["embedding"] for d in data], ref.dense)


def test_info_and_openapi_describe_the_outputs(http):
    info = http.get("/info").json()
    assert (
        info["outputs"] == ["dense", "sparse", "colbert"] and info["max_response_bytes"] == 64 * 1024 * 1024
    )
    spec = http.get("/openapi.json").json()
    assert "/embed_sparse" in spec["paths"]
    hf_req = spec["paths"]["/invocations"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "oneOf"
    ][0]
    assert {"return_sparse", "return_colbert_vecs", "return_dense", "dtype"} <= set(
        hf_req["properties"]["parameters"]["properties"]
    )


# -------------------------------------------------------------------------------- response limit
def test_answers_over_max_response_bytes_are_413_saying_how_to_stay_under(small_m3, ref):
    limit = 3000
    with (
        LocalServer(small_m3, max_response_bytes=limit) as srv,
        httpx.Client(base_url=srv.url, timeout=60) as c,
    ):
        r = c.post("/invocations", json={"inputs": TEXTS, "parameters": ALL})
        assert r.status_code == 413 and r.json()["error_type"] == "PayloadTooLarge"
        msg = r.json()["error"]
        for needle in (
            "at least",
            f"limit of {limit} bytes",
            "fewer",
            "application/x-npz",
            "float16",
            "max_response_bytes",
        ):
            assert needle in msg, msg
        # no lower bound before compute for lexical weights: refused once encoded, with the exact size
        r = c.post(
            "/invocations",
            json={"inputs": TEXTS * 20, "parameters": {"return_dense": False, "return_sparse": True}},
        )
        assert (
            r.status_code == 413 and "would be " in r.json()["error"] and "at least" not in r.json()["error"]
        )
        assert c.post("/embed_sparse", json={"inputs": TEXTS * 20}).status_code == 413
        # under the limit: the same outputs for one short input, float16 npz
        one = {"inputs": [TEXTS[2]], "parameters": {**ALL, "dtype": "float16"}}
        r = c.post("/invocations", json=one, headers={"Accept": NPZ})
        assert r.status_code == 200 and len(r.content) <= limit
        assert c.post("/invocations", json={"inputs": TEXTS * 20}).status_code == 200  # dense: unchecked
        client = local_runtime_client(srv.url)
        with pytest.raises(client.exceptions.ModelError) as err:
            client.invoke_endpoint(EndpointName="e", Body=json.dumps({"inputs": TEXTS, "parameters": ALL}))
        assert err.value.response["OriginalStatusCode"] == 413
        with EmbeddingClient(endpoint_url=srv.url, **FAST) as ec, pytest.raises(EndpointError) as info:
            ec.embed_multi(TEXTS)
        assert info.value.status == 413 and "max_response_bytes" in info.value.server_message


# ------------------------------------------------------------------------------- model without heads
def test_a_model_without_the_heads_says_so(tiny_model):
    with LocalServer(tiny_model) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/embed_sparse", json={"inputs": "hello"})
        assert r.status_code == 424 and r.json()["error_type"] == "Backend"
        assert "sparse_linear.pt" in r.json()["error"]
        r = c.post("/invocations", json={"inputs": "hello", "parameters": {"return_colbert_vecs": True}})
        assert r.status_code == 400 and "colbert_linear.pt" in r.json()["error"]
        assert c.get("/info").json()["outputs"] == ["dense"]
        assert "/embed_sparse" not in c.get("/openapi.json").json()["paths"]  # described when served
        assert c.post("/invocations", json={"inputs": "hello"}).status_code == 200


# ------------------------------------------------------------------------------------------- client
def test_the_client_matches_the_engine_over_every_contract_that_carries_the_outputs(server, ref, monkeypatch):
    with EmbeddingClient(endpoint_url=server.url, max_batch=2, **FAST) as c:
        assert_sparse(c.embed_sparse(TEXTS), ref.lexical_weights())
        m = c.embed_multi(TEXTS)
        assert_dense(m["dense_vecs"], ref.dense)
        assert_sparse(m["lexical_weights"], ref.lexical_weights())
        assert_colbert(m["colbert_vecs"], ref.colbert)
        half = c.embed_multi(TEXTS, ("colbert",), dtype="float16")
        assert half["dense_vecs"] is None and half["colbert_vecs"][0].dtype == np.float16
        assert_colbert(half["colbert_vecs"], ref.colbert, half=True)
    with EmbeddingClient(endpoint_url=server.url, contract="tei", **FAST) as c:
        assert_sparse(c.embed_sparse(TEXTS), ref.lexical_weights())
        m = c.embed_multi(TEXTS, ("dense", "sparse"))
        assert_dense(m["dense_vecs"], ref.dense)
        assert_sparse(m["lexical_weights"], ref.lexical_weights())
    for name in ("AWS_PROFILE", "EMBEDKIT_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    sm = dict(
        sagemaker_endpoint="alex-embedding-endpoint", sagemaker_endpoint_url=server.url, region="us-east-1"
    )
    with EmbeddingClient(**sm, max_batch=2, **FAST) as c:
        m = c.embed_multi(TEXTS)
        assert_dense(m["dense_vecs"], ref.dense)
        assert_sparse(m["lexical_weights"], ref.lexical_weights())
        assert_colbert(m["colbert_vecs"], ref.colbert)
    with EmbeddingClient(**sm, contract="tei", **FAST) as c, pytest.raises(Exception, match="InvokeEndpoint"):
        c.embed_sparse(TEXTS)

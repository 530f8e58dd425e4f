"""`embedkit serve` with the real default model: the local stand-in's curl smoke test, the boto3
snippet that calls a Terraform-built serverless endpoint, the `openai` client, and golden parity of
every contract against `Embedder.encode`."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest

from tests.contract.serving import ServerProcess
from tests.parity_texts import parity_texts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(["--model", "default"], log_dir=tmp_path_factory.mktemp("serve-default")) as srv:
        yield srv


@pytest.fixture
def aws_env(monkeypatch):
    """Dummy credentials: boto3 signs every request, and no real AWS is ever reached."""
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"):
        monkeypatch.delenv(k, raising=False)


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


TEXTS = [t for t in parity_texts() if t.strip()][:40]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_seed_002_smoke_test_with_curl(server):
    ping = subprocess.run(
        ["curl", "-s", "-i", server.url + "/ping"], capture_output=True, text=True, timeout=30
    )
    assert ping.stdout.startswith("HTTP/1.1 200")
    out = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "-X", "POST", server.url + "/invocations",
         "-d", '{"search_term": "geladeira frost free 375 litros"}'],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    body, status = out.stdout.rsplit("\n", 1)
    assert status == "200"
    embedding = json.loads(body)["embedding"]
    assert len(embedding) == 384 and all(isinstance(x, float) for x in embedding)


# The "Python Example" that calls the Terraform-built serverless endpoint, character for character,
# except the added endpoint_url argument.
SEED_004 = """
import boto3
import json

client = boto3.client('sagemaker-runtime', region_name='us-east-1', endpoint_url=ENDPOINT_URL)

response = client.invoke_endpoint(
    EndpointName='alex-embedding-endpoint',
    ContentType='application/json',
    Body=json.dumps({
        "inputs": "Hello, this is a sample text for embedding generation."
    })
)

result = json.loads(response['Body'].read().decode())
embeddings = result['embeddings']  # 384-dimensional vector
"""


def test_seed_004_snippet_verbatim_except_endpoint_url(server, aws_env, default_embedder):
    namespace = {"ENDPOINT_URL": server.url}
    exec(SEED_004, namespace)
    embeddings = namespace["embeddings"]
    assert len(embeddings) == 384
    expected = default_embedder.encode("Hello, this is a sample text for embedding generation.")
    assert np.array_equal(f32(embeddings), expected)


def test_openai_client_embeddings_create(server, default_embedder):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    texts = ["a cat sits on the mat", "ein Hund im Park"]
    res = client.embeddings.create(model="default", input=texts)  # the client asks for base64
    got = f32([d.embedding for d in res.data])
    assert np.array_equal(got, default_embedder.encode(texts))
    assert res.usage.prompt_tokens == default_embedder.tokenize(texts).num_tokens
    res = client.embeddings.create(model="default", input="one", encoding_format="float", dimensions=64)
    assert np.array_equal(f32(res.data[0].embedding), default_embedder.encode("one", dimensions=64))


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory):
    args = ["--model", "default", "--backend", "onnx"]
    with ServerProcess(args, log_dir=tmp_path_factory.mktemp("serve-onnx")) as srv:
        yield srv


@pytest.fixture(scope="module")
def onnx_embedder():
    from embedkit import Embedder

    return Embedder("default", device="cpu", backend="onnx")


def _needs_openvino() -> None:
    from embedkit.engine.graph import openvino_version

    if openvino_version() is None:
        pytest.skip("OpenVINO is not installed (the openvino extra; make install brings it)")


@pytest.fixture(scope="module")
def openvino_server(tmp_path_factory):
    _needs_openvino()
    args = ["--model", "default", "--backend", "openvino"]
    with ServerProcess(args, log_dir=tmp_path_factory.mktemp("serve-openvino")) as srv:
        yield srv


@pytest.fixture(scope="module")
def openvino_embedder():
    _needs_openvino()
    from embedkit import Embedder

    return Embedder("default", device="cpu", backend="openvino")


@pytest.fixture(scope="module")
def st_reference():
    from sentence_transformers import SentenceTransformer

    from embedkit.models import default_model_path

    return SentenceTransformer(str(default_model_path()), device="cpu").encode(TEXTS, batch_size=32)


def test_a_burst_of_one_text_queries_is_batched_not_run_one_by_one_on_the_loop(onnx_server, onnx_embedder):
    """An idle server answers a lone query on its event loop; queries that arrive meanwhile must
    still merge into batches on the worker (not each run inline in turn), with the same vectors."""
    import asyncio
    import re

    def batches(text: str) -> tuple[float, float]:
        count = float(re.search(r"^embedkit_batch_size_count (\S+)$", text, re.M).group(1))
        total = float(re.search(r"^embedkit_batch_size_sum (\S+)$", text, re.M).group(1))
        return count, total

    texts = [f"query number {i} about {TEXTS[i % len(TEXTS)][:40]}" for i in range(96)]

    async def burst() -> list[list[float]]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=onnx_server.url, timeout=60, limits=limits) as c:
            answers = await asyncio.gather(*(c.post("/invocations", json={"inputs": t}) for t in texts))
        return [r.json()["embeddings"] for r in answers]

    with httpx.Client(base_url=onnx_server.url, timeout=30) as c:
        before = batches(c.get("/metrics").text)
        got = asyncio.run(burst())
        after = batches(c.get("/metrics").text)
    n_batches, n_texts = after[0] - before[0], after[1] - before[1]
    assert n_texts == len(texts)
    # each one inline would be one batch per query; merged bursts measured ~55 batches for 96
    assert n_batches < 0.85 * len(texts), f"{n_batches:.0f} batches for {len(texts)} concurrent queries"
    np.testing.assert_allclose(f32(got), onnx_embedder.encode(texts), atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnx", "openvino"])
def test_golden_parity_every_contract_equals_the_engine(backend, request, st_reference):
    """Every answer shape carries the engine's vectors bit for bit (same backend), and the engine on
    every backend is within 1e-5 of sentence-transformers."""
    server = request.getfixturevalue("server" if backend == "torch" else f"{backend}_server")
    engine = request.getfixturevalue("default_embedder" if backend == "torch" else f"{backend}_embedder")
    assert engine.describe()["backend"] == backend
    expected = engine.encode(TEXTS)
    assert float(np.abs(expected - st_reference).max()) <= 1e-5
    one = engine.encode(TEXTS[3])
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/info").json()["backend"] == backend
        got = {
            "hf list": c.post("/invocations", json={"inputs": TEXTS}).json()["embeddings"],
            "search list": c.post("/invocations", json={"search_term": TEXTS}).json()["embeddings"],
            "tei": c.post("/embed", json={"inputs": TEXTS, "truncate": True}).json(),
            "openai float": [
                d["embedding"]
                for d in c.post("/v1/embeddings", json={"input": TEXTS, "model": "m"}).json()["data"]
            ],
            "runtime": c.post("/endpoints/any/invocations", json={"inputs": TEXTS}).json()["embeddings"],
            "jsonlines": [
                json.loads(line)["embedding"]
                for line in c.post(
                    "/invocations",
                    content="\n".join(json.dumps(t) for t in TEXTS).encode(),
                    headers={"Content-Type": "application/jsonlines"},
                ).text.splitlines()
            ],
        }
        b64 = c.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "base64"}).json()["data"]
        got["openai base64"] = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64]
        npy = c.post("/invocations", json={"inputs": TEXTS}, headers={"Accept": "application/x-npy"})
        got["npy"] = np.load(io.BytesIO(npy.content), allow_pickle=False)
        csv_texts = [t for t in TEXTS if "\n" not in t and '"' not in t and "," not in t and t == t.strip()]
        csv = c.post(
            "/invocations", content="\n".join(csv_texts).encode(), headers={"Content-Type": "text/csv"}
        )
        hf_one = c.post("/invocations", json={"inputs": TEXTS[3]}).json()["embeddings"]
        search_one = c.post("/invocations", json={"search_term": TEXTS[3]}).json()["embedding"]
    for name, vecs in got.items():
        assert np.array_equal(f32(vecs), expected), name
    assert np.array_equal(f32(csv.json()["embeddings"]), engine.encode(csv_texts))
    assert np.array_equal(f32(hf_one), one) and np.array_equal(f32(search_one), one)


def test_an_auto_server_measures_the_packed_graph_and_merged_bursts_keep_their_vectors(
    tmp_path, st_reference
):
    """With auto (the default), the server compiles the packed graph once ready, times it against
    length groups on the worker, and says which it kept in /info; a burst of concurrent queries of
    mixed lengths (merged batches) then comes back within 1e-5 of sentence-transformers."""
    import asyncio

    _needs_openvino()
    args = ["--model", "default", "--backend", "auto"]
    with ServerProcess(args, log_dir=tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        note = c.get("/info").json()["merged_batches"]
        deadline = time.monotonic() + 180  # bounded: a compile and a few jobs on the worker after ready
        while note.startswith("length groups until") and time.monotonic() < deadline:
            time.sleep(0.2)
            note = c.get("/info").json()["merged_batches"]
        if "does not fit" in note or "could not compile" in note:
            pytest.skip(f"the packed graph was refused here: {note}")
        assert note.startswith(("packed on OpenVINO (f32): ", "length groups: ")), note
        assert "ms packed against" in note and "merged batches of mixed lengths" in srv.log()

        async def burst() -> list[list[float]]:
            limits = httpx.Limits(max_connections=len(TEXTS))
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as ac:
                answers = await asyncio.gather(*(ac.post("/invocations", json={"inputs": t}) for t in TEXTS))
            return [r.json()["embeddings"] for r in answers]

        got = f32(asyncio.run(burst()))
    assert float(np.abs(got - st_reference).max()) <= 1e-5

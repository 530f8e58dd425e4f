"""Real third-party clients, unchanged, against a real `embedkit serve` on loopback (tiny model): the
AWS CLI (v1, as pip installs it), LangChain's `SagemakerEndpointEmbeddings`, llama-index's
`SageMakerEmbedding` (with `--hf-mode tei`), boto3, urllib and curl reading the 413 of a body over the
limit, and a SageMaker Batch Transform job's requests. Every answer carries `Embedder.encode`'s vectors.

The AWS CLI, LangChain and llama-index run in `.venv-clients` (`make clients`; `make test` builds it
and sets EMBEDKIT_REQUIRE_CLIENTS=1, so CI fails instead of skipping when it is missing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.contract.serving import ROOT, ServerProcess, local_runtime_client

CLIENT_SCRIPT = ROOT / "tests" / "clients" / "run_client.py"
TEXTS = ["the cat sat on the mat", "a dog runs in the park", "hello world", "fast red car"]
LIMIT = 6 * 1024 * 1024
OVERSIZED = json.dumps({"inputs": ["x" * 1000] * 7400}).encode()  # ~7 MiB, over the 6 MiB limit


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


@pytest.fixture(scope="module")
def clients_python() -> Path:
    """The interpreter of the client venv (EMBEDKIT_CLIENTS_PYTHON, else .venv-clients)."""
    path = Path(os.environ.get("EMBEDKIT_CLIENTS_PYTHON") or ROOT / ".venv-clients" / "bin" / "python")
    if not path.exists():
        if os.environ.get("EMBEDKIT_REQUIRE_CLIENTS") == "1":
            pytest.fail(f"{path} is missing; `make clients` builds it")
        pytest.skip(f"{path} is missing; run `make clients` to build the client venv")
    return path


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory) -> dict[str, str]:
    """Dummy credentials and no config files: clients sign requests, and reach only loopback."""
    home = tmp_path_factory.mktemp("aws-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(home / "config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "credentials"),
        AWS_MAX_ATTEMPTS="1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with ServerProcess(["--model", str(tiny_model)], log_dir=tmp_path_factory.mktemp("clients")) as srv:
        yield srv


@pytest.fixture(scope="module")
def tei_server(tiny_model, tmp_path_factory):
    args = ["--model", str(tiny_model), "--hf-mode", "tei"]
    with ServerProcess(args, log_dir=tmp_path_factory.mktemp("clients-tei")) as srv:
        yield srv


def run_client(python: Path, args: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(
        [str(python), str(CLIENT_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def aws_cli(python: Path, env: dict[str, str], url: str, body: Path, out: Path, *extra: str):
    cmd = [str(python.parent / "aws"), "sagemaker-runtime", "invoke-endpoint", "--endpoint-url", url]
    cmd += ["--endpoint-name", "my-embeddings", "--body", f"fileb://{body}", *extra, str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_aws_cli_invokes_the_endpoint_and_reports_model_errors_and_the_size_limit(
    server, clients_python, aws_env, tiny_embedder, tmp_path
):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"inputs": TEXTS}))
    answer = tmp_path / "answer.json"
    ok = aws_cli(clients_python, aws_env, server.url, request, answer, "--content-type", "application/json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ContentType"] == "application/json"
    assert np.array_equal(f32(json.loads(answer.read_text())["embeddings"]), tiny_embedder.encode(TEXTS))

    request.write_text(json.dumps({"inputs": ["ok", 7]}))
    bad = aws_cli(clients_python, aws_env, server.url, request, tmp_path / "bad.json")
    assert bad.returncode == 255, bad.stderr  # v1's exit code for a service error
    assert "(ModelError)" in bad.stderr and "Received client error (400)" in bad.stderr
    assert "inputs[1] must be a string" in bad.stderr

    request.write_bytes(OVERSIZED)
    big = aws_cli(clients_python, aws_env, server.url, request, tmp_path / "big.json")
    assert big.returncode == 255, big.stderr
    assert f"(413) when calling the InvokeEndpoint operation: HTTP content length exceeded {LIMIT} bytes" in (
        big.stderr
    )


def test_langchain_sagemaker_endpoint_embeddings_with_a_boto3_client(
    server, clients_python, aws_env, tiny_embedder
):
    got = run_client(clients_python, ["langchain", server.url, *TEXTS], aws_env)
    assert np.array_equal(f32(got["documents"]), tiny_embedder.encode(TEXTS))
    assert np.array_equal(f32(got["query"]), tiny_embedder.encode(TEXTS[0]))


def test_llama_index_sagemaker_embedding_default_io_handler_with_hf_mode_tei(
    tei_server, clients_python, aws_env, tiny_embedder
):
    env = {**aws_env, "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": tei_server.url}
    got = run_client(clients_python, ["llama-index", "my-embeddings", *TEXTS], env)
    assert np.array_equal(f32(got["documents"]), tiny_embedder.encode(TEXTS))
    assert np.array_equal(f32(got["query"]), tiny_embedder.encode(TEXTS[0]))


def test_tei_mode_answers_a_bare_list_of_vectors_on_both_surfaces(tei_server, tiny_embedder):
    expected = tiny_embedder.encode(TEXTS)
    with httpx.Client(base_url=tei_server.url, timeout=30) as c:
        many = c.post("/invocations", json={"inputs": TEXTS})
        one = c.post("/invocations", json={"inputs": TEXTS[1]})
        runtime = c.post("/endpoints/x/invocations", json={"inputs": TEXTS})
        embed = c.post("/embed", json={"inputs": TEXTS})
        options = c.post("/invocations", json={"inputs": TEXTS, "normalize": False, "dimensions": 8})
        long = c.post("/invocations", json={"inputs": ["ok", "the cat " * 40]})
        search = c.post("/invocations", json={"search_term": TEXTS[1]})
        info = c.get("/info").json()
    assert info["hf_mode"] == "tei"
    assert np.array_equal(f32(many.json()), expected)
    assert one.json() == [many.json()[1]]  # a list of one vector for a string, as TEI answers
    assert np.array_equal(f32(runtime.json()), expected) and np.array_equal(f32(embed.json()), expected)
    assert np.array_equal(f32(options.json()), tiny_embedder.encode(TEXTS, normalize=False, dimensions=8))
    assert long.status_code == 400 and "inputs[1] has 82 tokens" in long.json()["error"]  # TEI: no truncation
    assert np.array_equal(f32(search.json()["embedding"]), expected[1])


def test_boto3_urllib_and_curl_read_the_413_of_a_body_over_the_limit(server):
    for path in ("/invocations", "/embed", "/v1/embeddings"):
        request = urllib.request.Request(
            server.url + path, data=OVERSIZED, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as err:  # urllib sends Connection: close
            urllib.request.urlopen(request, timeout=60)
        assert err.value.code == 413, path
        assert json.loads(err.value.read())["error_type"] == "PayloadTooLarge", path

    client = local_runtime_client(server.url)
    with pytest.raises(client.exceptions.ClientError) as err:
        client.invoke_endpoint(EndpointName="my-embeddings", Body=OVERSIZED, ContentType="application/json")
    error = err.value.response["Error"]
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert error["Code"] == "413" and error["Message"] == f"HTTP content length exceeded {LIMIT} bytes."

    if shutil.which("curl"):  # curl sends Expect: 100-continue for a body this large, then the body
        curl = ["curl", "-sS", "-w", "\n%{http_code}", "--data-binary", "@-", "-H", "Content-Type: x-json"]
        for expect in ([], ["-H", "Expect:"]):
            out = subprocess.run(
                [*curl, *expect, server.url + "/invocations"],
                input=OVERSIZED,
                capture_output=True,
                timeout=60,
            )
            body, _, status = out.stdout.decode().rpartition("\n")
            assert out.returncode == 0 and status == "413", out.stderr
            assert "max_body_bytes" in json.loads(body)["error"]
    ok = httpx.post(server.url + "/invocations", json={"inputs": "still here"}, timeout=30)
    assert ok.status_code == 200


def test_batch_transform_gets_its_parameters_and_one_json_line_per_input_line(server, tiny_embedder):
    texts = [f"line {i} the cat sat" + " on the mat" * (i % 3) for i in range(1100)]  # > 512 per request
    body = "\n".join(json.dumps({"inputs": t}) if i % 2 else json.dumps(t) for i, t in enumerate(texts))
    with httpx.Client(base_url=server.url, timeout=120) as c:
        params = c.get("/execution-parameters")
        assert params.json() == {
            "MaxConcurrentTransforms": 1,
            "BatchStrategy": "MULTI_RECORD",
            "MaxPayloadInMB": 6,
        }
        # max_client_batch_size (512) lines at a time, each slice exactly as Embedder.encode embeds it
        expected = np.concatenate([tiny_embedder.encode(texts[i : i + 512]) for i in range(0, 1100, 512)])
        for ctype in ("application/jsonlines", "application/json-lines", "application/x-jsonlines"):
            r = c.post("/invocations", content=(body + "\n").encode(), headers={"Content-Type": ctype})
            assert r.status_code == 200 and r.headers["content-type"] == "application/jsonlines", r.text
            lines = r.text.splitlines()
            assert len(lines) == len(texts) and all(set(json.loads(x)) == {"embedding"} for x in lines[:5])
            assert np.array_equal(f32([json.loads(x)["embedding"] for x in lines]), expected), ctype
        as_json = c.post(
            "/invocations",
            content=body.encode(),
            headers={"Content-Type": "application/jsonlines", "Accept": "application/json"},
        )
        assert np.array_equal(f32(as_json.json()["embeddings"]), expected)
        csv = c.post("/invocations", content="\n".join(texts).encode(), headers={"Content-Type": "text/csv"})
        assert np.array_equal(f32(csv.json()["embeddings"]), expected)  # CSV: any number of lines too
        bad = c.post(
            "/invocations",
            content=b'"ok"\n{"inputs": 3}\n',
            headers={"Content-Type": "application/jsonlines"},
        )
        assert bad.status_code == 400 and "line 2" in bad.json()["error"]

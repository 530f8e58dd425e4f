"""`embedkit serve` on a real uvicorn (tiny model): contracts, the error table, hostile input, metrics,
boto3's view of errors, and a schemathesis run against the server's own OpenAPI spec."""

from __future__ import annotations

import base64
import io
import json
import random
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.contract.serving import ServerProcess, local_runtime_client

pytestmark = pytest.mark.slow  # ~90 s: real uvicorn servers on 2 cores


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    srv = ServerProcess(["--model", str(tiny_model)], log_dir=tmp_path_factory.mktemp("serve-tiny"))
    with srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def vec(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def test_ping_is_200_with_the_model_loaded_and_info_describes_it(http):
    assert http.get("/ping").status_code == 200
    info = http.get("/info").json()
    assert info["ready"] is True and info["dimension"] == 32 and info["max_seq_length"] == 32


def test_per_request_options_match_the_engine(http, tiny_embedder):
    texts = ["the cat", "the cat sat on the mat", "a"]
    body = {"inputs": texts, "parameters": {"normalize": False, "dimensions": 8}}
    got = vec(http.post("/invocations", json=body).json()["embeddings"])
    assert np.array_equal(got, tiny_embedder.encode(texts, normalize=False, dimensions=8))
    tei = vec(http.post("/embed", json={"inputs": texts, "dimensions": 4}).json())
    assert np.array_equal(tei, tiny_embedder.encode(texts, dimensions=4))


def test_a_chunked_or_expect_continue_body_gets_the_same_answer_as_a_declared_one(http, tiny_embedder):
    """Bodies the query routes' short path does not take (no declared length, or Expect:
    100-continue) go through the full stack and get the same vectors."""
    texts = ["the cat sat", "a"]
    payload = json.dumps({"inputs": texts}).encode()
    expected = tiny_embedder.encode(texts)
    for route, key in (("/invocations", "embeddings"), ("/v1/embeddings", None)):
        body = payload if key else json.dumps({"input": texts, "model": "m"}).encode()
        chunked = http.post(
            route, content=iter([body[:7], body[7:]]), headers={"content-type": "application/json"}
        )
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        continued = http.post(
            route, content=body, headers={"content-type": "application/json", "expect": "100-continue"}
        )
        for r in (chunked, continued):
            assert r.status_code == 200, r.text
            got = r.json()[key] if key else [d["embedding"] for d in r.json()["data"]]
            assert np.array_equal(vec(got), expected)


def test_codecs_and_accept_negotiation_over_http(http, tiny_embedder):
    texts = ["first line", "second, with a comma", "third one here"]
    expected = tiny_embedder.encode(texts)
    r = http.post(
        "/invocations",
        content="\n".join(texts).encode(),
        headers={"Content-Type": "text/csv", "Accept": "application/x-npy"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    assert np.array_equal(np.load(io.BytesIO(r.content), allow_pickle=False), expected)
    lines = "\n".join(json.dumps({"inputs": t}) for t in texts).encode()
    r = http.post(
        "/invocations", content=lines, headers={"Content-Type": "application/jsonlines", "Accept": "text/csv"}
    )
    rows = [row.split(",") for row in r.text.splitlines()]
    assert r.headers["content-type"].startswith("text/csv") and np.array_equal(vec(rows), expected)


@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"content": b'{"inputs": '}, 400, "not valid JSON"),
        ({"json": {"inputs": ["ok", 3]}}, 400, "inputs[1] must be a string"),
        ({"json": {"inputs": ["ok", ""]}}, 400, "inputs[1] is an empty string"),
        ({"json": {"inputs": []}}, 400, "empty list"),
        ({"json": {"text": "x"}}, 400, '"inputs" field'),
        ({"json": {"inputs": "x", "parameters": {"dimensions": 33}}}, 400, "between 1 and 32"),
        (
            {"json": {"inputs": "the cat " * 40, "parameters": {"truncate": False}}},
            400,
            "inputs[0] has 82 tokens",
        ),
        ({"json": {"inputs": ["x"] * 513}}, 413, "max_client_batch_size"),
        ({"content": b"x" * (6 * 1024 * 1024 + 1)}, 413, "max_body_bytes"),
        ({"content": b"x", "headers": {"Content-Type": "application/xml"}}, 415, "Content-Type"),
        ({"json": {"inputs": "x"}, "headers": {"Accept": "image/png"}}, 406, "Accept"),
    ],
)
def test_error_table_rows_name_the_field_and_never_leak_a_traceback(http, kwargs, status, needle):
    r = http.post("/invocations", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and needle in body["error"]
    assert "Traceback" not in r.text


def test_unknown_routes_and_methods_are_json_404_and_405(http):
    assert http.get("/nope").status_code == 404
    r = http.get("/invocations")
    assert r.status_code == 405 and r.json()["error_type"] == "NotFound"


def hostile_requests(seed: int = 7, n: int = 1000) -> list[tuple[str, str, dict]]:
    """``n`` malformed or hostile requests: bad JSON, wrong types, nesting, junk, wrong types/methods."""
    rnd = random.Random(seed)
    junk = lambda k: bytes(rnd.getrandbits(8) for _ in range(k))  # noqa: E731
    texts_bad = [1, None, True, [], {}, [1, 2], [None], {"a": 1}, [[["x"]]], 1e308, -1, [""], ["x", {}], ""]
    top_bad = [1, None, True, "s", [], {}, [1, 2], ["x"], {"a": 1}, 1e308]
    params_bad = [1, True, "s", [], [1, 2], {"a": 1}, {"dimension": 3}, {"normalize": "yes"}]
    dims_bad = [True, "s", [], {}, 1e308, -1, 0, 33, 2.5]
    fmt_bad = [1, True, "s", [], {}, "int8"]
    gens = [
        lambda: ("POST", "/invocations", {"content": junk(rnd.randint(1, 300))}),
        lambda: ("POST", "/invocations", {"content": b'{"inputs": ' + junk(20)}),
        lambda: ("POST", "/invocations", {"json": {"inputs": rnd.choice(texts_bad)}}),
        lambda: ("POST", "/invocations", {"json": {"search_term": rnd.choice(texts_bad)}}),
        lambda: ("POST", "/invocations", {"json": rnd.choice(top_bad)}),
        lambda: ("POST", "/invocations", {"json": {"inputs": "x", "parameters": rnd.choice(params_bad)}}),
        lambda: (
            "POST",
            "/invocations",
            {"json": {"inputs": "x", "parameters": {"dimensions": rnd.choice(dims_bad)}}},
        ),
        lambda: ("POST", "/invocations", {"content": b"[" * rnd.randint(1025, 200_000)}),
        lambda: ("POST", "/invocations", {"content": b'{"inputs": "\\ud800"}'}),
        lambda: (
            "POST",
            "/invocations",
            {
                "content": junk(50),
                "headers": {
                    "Content-Type": rnd.choice(
                        [
                            "application/octet-stream",
                            "image/png",
                            "text/plain",
                            "multipart/form-data",
                            "application/x-npy",
                        ]
                    )
                },
            },
        ),
        lambda: ("POST", "/invocations", {"content": junk(64), "headers": {"Content-Type": "text/csv"}}),
        lambda: ("POST", "/invocations", {"content": b"\n\n", "headers": {"Content-Type": "text/csv"}}),
        lambda: ("POST", "/invocations", {"json": {"inputs": "x"}, "headers": {"Accept": "image/gif"}}),
        lambda: ("POST", "/invocations", {"json": {"inputs": ["x"] * rnd.randint(513, 2000)}}),
        lambda: (rnd.choice(["GET", "PUT", "DELETE", "PATCH"]), "/invocations", {}),
        lambda: ("GET", "/" + junk(8).hex(), {}),
        lambda: ("POST", "/embed", {"json": {"inputs": rnd.choice([*texts_bad, "ok"]), "normalize": "yes"}}),
        lambda: ("POST", "/embed", {"content": junk(40)}),
        lambda: ("POST", "/v1/embeddings", {"json": {"input": rnd.choice([[1, 2], [[3]], None, 5])}}),
        lambda: (
            "POST",
            "/v1/embeddings",
            {"json": {"input": "x", "encoding_format": rnd.choice(fmt_bad)}},
        ),
        lambda: ("POST", "/endpoints/e/invocations", {"content": junk(30)}),
    ]
    out = [rnd.choice(gens)() for _ in range(n - 3)]
    big = b"x" * (6 * 1024 * 1024 + 10)
    out += [("POST", "/invocations", {"content": big})] * 2 + [("POST", "/embed", {"content": big})]
    return out


def test_a_thousand_hostile_requests_get_4xx_and_the_server_keeps_answering(server, tiny_embedder):
    requests = hostile_requests()

    def send(chunk):
        statuses = []
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for method, path, kwargs in chunk:
                statuses.append((c.request(method, path, **kwargs).status_code, method, path))
        return statuses

    with ThreadPoolExecutor(8) as pool:
        results = [s for part in pool.map(send, [requests[i::8] for i in range(8)]) for s in part]
    assert len(results) == 1000
    bad = [r for r in results if not 400 <= r[0] < 500]
    assert not bad, bad[:10]
    r = httpx.post(server.url + "/invocations", json={"inputs": "still alive"}, timeout=30)
    assert r.status_code == 200 and np.array_equal(
        vec(r.json()["embeddings"]), tiny_embedder.encode("still alive")
    )
    assert httpx.get(server.url + "/ping").status_code == 200


def test_boto3_parses_model_errors_with_the_original_status_and_message(server):
    client = local_runtime_client(server.url)
    with pytest.raises(client.exceptions.ModelError) as err:
        client.invoke_endpoint(EndpointName="any-name", Body=json.dumps({"inputs": ["ok", 7]}))
    resp = err.value.response
    assert resp["OriginalStatusCode"] == 400
    assert "inputs[1] must be a string" in resp["OriginalMessage"]
    assert resp["Error"]["Code"] == "ModelError"
    ok = client.invoke_endpoint(EndpointName="any-name", Body=json.dumps({"inputs": "fine"}))
    assert ok["ContentType"] == "application/json" and ok["InvokedProductionVariant"] == "AllTraffic"


def test_openai_base64_round_trips_float32(http, tiny_embedder):
    texts = ["one", "two words"]
    r = http.post("/v1/embeddings", json={"input": texts, "model": "tiny", "encoding_format": "base64"})
    data = r.json()["data"]
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data])
    assert np.array_equal(got, tiny_embedder.encode(texts))
    assert r.json()["usage"]["prompt_tokens"] == int(tiny_embedder.tokenize(texts).num_tokens)


def test_metrics_count_requests_by_route_and_status_and_batches(http):
    http.post("/invocations", json={"inputs": "count me"})
    http.post("/invocations", json={"inputs": []})
    http.post("/invocations", json={"inputs": "the cat " * 40})  # truncated
    text = http.get("/metrics").text
    assert 'embedkit_requests_total{route="/invocations",status="200"}' in text
    assert 'embedkit_requests_total{route="/invocations",status="400"}' in text
    assert "embedkit_request_duration_seconds_bucket" in text and "embedkit_batch_size_count" in text
    truncated = float(re.search(r"^embedkit_truncated_inputs_total (\S+)$", text, re.M).group(1))
    assert truncated >= 1 and "embedkit_queue_tokens" in text and "embedkit_ready 1.0" in text


@pytest.mark.skipif(
    shutil.which("schemathesis") is None and not (Path(sys.executable).parent / "schemathesis").exists(),
    reason="schemathesis not installed (pip install -e .[dev])",
)
def test_schemathesis_finds_no_5xx_and_no_schema_violation(server, tmp_path):
    exe = Path(sys.executable).parent / "schemathesis"
    cmd = [str(exe) if exe.exists() else "schemathesis", "run", server.url + "/openapi.json"]
    cmd += [
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance,response_headers_conformance",
    ]
    cmd += ["-n", "10", "--phases", "coverage,fuzzing", "--seed", "1", "--no-color", "-w", "1"]
    cmd += ["--generation-database", "none", "--request-timeout", "20"]  # --max-time would fuzz until spent
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "No issues found" in out.stdout


def test_auto_backend_answers_on_torch_first_then_attaches_the_graph_after_ready(
    tiny_model, tiny_embedder, tmp_path
):
    """/ping turns 200 before the ONNX session opens and auto measures (both stay out of the cold
    start); the switch then happens on the inference worker, and vectors stay within 1e-5."""
    texts = ["hello world", "the cat sat on the mat", "a small red car in the park"]
    args = ["--model", str(tiny_model), "--backend", "auto"]
    with ServerProcess(args, log_dir=tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        first = vec(c.post("/invocations", json={"inputs": texts}).json()["embeddings"])
        plan = c.get("/info").json()["backend_plan"]
        for _ in range(300):  # bounded: the switch is one job on the worker
            if "until the ONNX graph is attached" not in plan:
                break
            c.post("/invocations", json={"inputs": "tick"})  # queues behind the switch
            plan = c.get("/info").json()["backend_plan"]
        assert c.get("/info").json()["backend"] == "auto"
        assert plan.startswith(("onnx for batches up to", "onnx for every batch", "torch for every batch")), (
            plan
        )
        after = vec(c.post("/invocations", json={"inputs": texts}).json()["embeddings"])
    expected = tiny_embedder.encode(texts)
    assert float(np.abs(first - expected).max()) <= 1e-5
    assert float(np.abs(after - expected).max()) <= 1e-5


def test_a_torch_only_server_prices_its_forward_pass_after_ready(tiny_model, tmp_path):
    """Without auto's measurement, the server times torch on three small shapes as one job on the
    worker after /ping turns 200, so merged requests are split into length groups at its real cost
    (on a tiny random model the times may not grow with tokens, so the price may stay unset)."""
    # two threads, whatever OMP_NUM_THREADS earlier tests left (Ray sets it), so one is weighed
    args = ["--model", str(tiny_model), "--backend", "torch", "--threads", "2"]
    with ServerProcess(args, log_dir=tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for _ in range(300):  # bounded: one job on the worker, right after ready
            if "one more torch forward pass costs" in srv.log():
                break
            c.post("/invocations", json={"inputs": "tick"})  # queues behind the measurement
        assert "one more torch forward pass costs" in srv.log()
        info = c.get("/info").json()
        assert info["backend"] == "torch"
        assert info["unpadded"] is True  # a BERT model: dense layers on real tokens only
        cost = info["forward_cost_tokens"]
        assert cost is None or 4 <= cost <= 1024
        # which small torch batches run on one thread: measured with the cost, on the probe shapes
        one = info["torch_one_thread_tokens"]
        assert one in {0, 16, 4 * 32, 8 * 32}, one  # COST_SHAPES within the tiny model's 32 tokens
        assert "; torch runs " in srv.log()

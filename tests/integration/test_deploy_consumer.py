"""The local stand-in for a SageMaker endpoint, end to end: the example consumer
(deploy/compose/consumer/app.py) runs unchanged against `embedkit serve` through EMBEDKIT_ENDPOINT_URL
and through the SageMaker transport (boto3 pointed at the same server's runtime surface), and gets
identical vectors: only configuration differs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedkit.cli import main
from tests.conftest import free_port, stop

pytestmark = pytest.mark.slow  # ~30 s: the compose stack's consumer against a live server on 2 cores

ROOT = Path(__file__).resolve().parents[2]
CONSUMER = ROOT / "deploy" / "compose" / "consumer" / "app.py"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """`embedkit serve` on a random loopback port with the tiny model; yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(log.parent),
        "HF_HUB_OFFLINE": "1",
        "SM_MODEL_DIR": str(log.parent / "no-model"),
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "embedkit"), "serve", "--model", str(tiny_model), "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"embedkit serve exited: {log.read_text()[-2000:]}"
            try:
                if httpx.get(url + "/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"/ping not 200 in time: {log.read_text()[-2000:]}"
            time.sleep(0.1)
        # With auto (the default), /ping turns 200 on torch and the graph attaches after it; vectors
        # are bit for bit the same only once the plan is settled (before, within 1e-5), so the two
        # transports are compared after it.
        while (
            "until the ONNX graph is attached" in httpx.get(url + "/info", timeout=5).json()["backend_plan"]
        ):
            assert time.monotonic() < deadline, f"the graph did not attach in time: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield url
    finally:
        stop(proc, timeout=40)


def run_consumer(env: dict[str, str], *queries: str) -> dict:
    base = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": "/nonexistent", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(CONSUMER), "--json", *queries],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_consumer_gets_identical_vectors_locally_and_through_sagemaker(served, tiny_embedder):
    local = run_consumer({"EMBEDKIT_ENDPOINT_URL": served})  # no AWS variables at all
    sagemaker = run_consumer(
        {
            "EMBEDKIT_SAGEMAKER_ENDPOINT": "alex-embedding-endpoint",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": served,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        }
    )
    assert (local["transport"], sagemaker["transport"]) == ("http", "sagemaker")
    for key in ("catalog", "queries"):
        a, b = np.asarray(local[key], np.float32), np.asarray(sagemaker[key], np.float32)
        assert a.shape[1] == 32
        np.testing.assert_array_equal(a, b)
    assert local["results"] == sagemaker["results"]
    # ... and they are the engine's own vectors for the same texts
    sys.path.insert(0, str(CONSUMER.parent))
    try:
        from app import CATALOG
    finally:
        sys.path.remove(str(CONSUMER.parent))
    np.testing.assert_allclose(
        np.asarray(local["catalog"], np.float32), tiny_embedder.encode(CATALOG), atol=1e-5
    )


def test_consumer_search_term_contract_matches_hf(served):
    hf = run_consumer({"EMBEDKIT_ENDPOINT_URL": served}, "uma geladeira")
    st = run_consumer({"EMBEDKIT_ENDPOINT_URL": served, "EMBEDKIT_CONTRACT": "search_term"}, "uma geladeira")
    np.testing.assert_allclose(np.asarray(hf["queries"]), np.asarray(st["queries"]), atol=1e-6)


def test_invoke_smoke_test_against_embedkit_serve(served, capsys, monkeypatch):
    for name in ("EMBEDKIT_SAGEMAKER_ENDPOINT", "EMBEDKIT_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    assert main(["invoke", "--endpoint-url", served, "--no-vectors", "geladeira frost free 375 litros"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dimension"] == 32 and abs(out["norms"][0] - 1.0) < 1e-5 and "embeddings" not in out
    # a server-side 400 (over-long input, truncation off) comes back as exit 1 with the server's words
    long_text = "palavra " * 200
    assert main(["invoke", "--endpoint-url", served, "--truncate", "false", long_text]) == 1
    assert "inputs[0]" in capsys.readouterr().err

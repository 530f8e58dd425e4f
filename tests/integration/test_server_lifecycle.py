"""Server lifecycle on a real uvicorn: /ping 503 until the model is loaded, custom inference.py hooks
falling back to the batched engine, a dead inference worker turning /ping 503, and SIGTERM under load
losing no accepted request."""

from __future__ import annotations

import re
import shutil
import threading

import httpx
import numpy as np
import pytest

from tests.contract.serving import ServerProcess

pytestmark = pytest.mark.slow  # ~65 s: server processes started, signalled and stopped on 2 cores

HANDLER = """
import json
import os
import time
from pathlib import Path

import numpy as np

from embedkit import Embedder


def model_fn(model_dir, context):
    release = Path(model_dir) / "release"
    deadline = time.monotonic() + 120
    while not release.exists():  # the test keeps the model "loading" until it creates this file
        if time.monotonic() > deadline:
            raise RuntimeError("never released")
        time.sleep(0.05)
    # the engine reads no environment: the suite's pinned backend (conftest) is passed in
    return Embedder(model_dir, backend=os.environ.get("EMBEDKIT_BACKEND"))


class BadQuery(Exception):
    status_code = 422


def input_fn(body, content_type):
    if body == b"exit":
        raise SystemExit("a hook that exits kills the inference worker")
    data = json.loads(body)
    if "query" not in data:
        raise BadQuery("send {'query': ...}")
    return {"inputs": [data["query"]]}


def output_fn(prediction, accept):
    vectors = np.asarray(prediction["embeddings"]).tolist()
    return json.dumps({"vectors": vectors, "accept": accept}), "application/vnd.custom+json"
"""


def test_custom_handler_lifecycle_from_loading_to_a_dead_worker(tiny_model, tiny_embedder, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    (model_dir / "code").mkdir()
    (model_dir / "code" / "inference.py").write_text(HANDLER)
    srv = ServerProcess([], env={"SM_MODEL_DIR": str(model_dir)}, log_dir=tmp_path)
    srv.start(wait_ready=False)
    try:
        srv.wait_status("/ping", 503)  # socket bound, model still loading
        r = httpx.post(srv.url + "/invocations", json={"query": "the cat"}, timeout=30)
        assert r.status_code == 503 and "loading" in r.json()["error"]
        (model_dir / "release").touch()
        srv.wait_status("/ping", 200)

        r = httpx.post(srv.url + "/invocations", json={"query": "the cat sat"}, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.custom+json"
        assert r.json()["accept"] == "application/json"
        assert np.array_equal(
            np.asarray(r.json()["vectors"], np.float32), tiny_embedder.encode(["the cat sat"])
        )
        r = httpx.post(srv.url + "/invocations", json={"q": 1}, timeout=30)
        assert r.status_code == 422 and r.json()["error"] == "send {'query': ...}"
        assert "input_fn, output_fn" in srv.log() or "'input_fn', 'output_fn'" in srv.log()

        r = httpx.post(srv.url + "/invocations", content=b"exit", timeout=30)
        assert r.status_code == 503
        assert httpx.get(srv.url + "/ping").status_code == 503
        r = httpx.post(srv.url + "/embed", json={"inputs": "x"}, timeout=30)
        assert r.status_code == 503 and "worker" in r.json()["error"]
        assert srv.terminate() == 0
    finally:
        srv.stop()


def test_sigterm_during_load_answers_every_accepted_request_and_exits_0(tiny_model, tmp_path):
    srv = ServerProcess(["--model", str(tiny_model)], log_dir=tmp_path).start()
    statuses: list[int] = []
    lock = threading.Lock()
    enough = threading.Event()

    def client(i: int) -> None:
        body = {"inputs": [f"request {i} text {k} " + "word " * (k % 20) for k in range(8)]}
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for _ in range(2000):
                try:
                    r = c.post("/invocations", json=body)
                except httpx.TransportError:  # the server stopped accepting: not an accepted request
                    return
                with lock:
                    statuses.append(r.status_code)
                    if len(statuses) >= 100:
                        enough.set()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    try:
        for t in threads:
            t.start()
        assert enough.wait(120), srv.log()
        code = srv.terminate(timeout=30)  # SageMaker sends SIGKILL 30 s after SIGTERM
        for t in threads:
            t.join(60)
        assert code == 0, srv.log()
        assert set(statuses) == {200}, sorted(set(statuses))
        answered = re.search(r"shutdown complete: (\d+) requests answered", srv.log())
        assert answered, srv.log()
        assert int(answered.group(1)) == len(statuses)
    finally:
        srv.stop()

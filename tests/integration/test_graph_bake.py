"""Cold starts: `embedkit graph bake` and `sagemaker package-model` put the ONNX graph next to the
weights, and a fresh engine or server with an empty cache uses it instead of exporting one; a graph
baked for other weights is never used."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from embedkit import Embedder
from embedkit.cli import main as cli
from embedkit.engine.graph import BAKED_DIR, GRAPH_FILE, KEY_FILE, openvino_version, runtime_version
from embedkit.testing import build_tiny_bert
from tests.contract.serving import ServerProcess

pytestmark = pytest.mark.skipif(runtime_version() is None, reason="needs onnxruntime and onnx")

TEXTS = ["a cat sits on the mat", "ein Hund im Park", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture
def model_copy(tmp_path, tiny_model) -> Path:
    """A private copy of the tiny model (baking writes into the model's folder)."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def fresh_cache(monkeypatch, root: Path) -> Path:
    """Point EMBEDKIT_CACHE_DIR at a new empty folder, as in a new container: no graphs, no hashes."""
    cache = root / "fresh-cache"
    monkeypatch.setenv("EMBEDKIT_CACHE_DIR", str(cache))
    return cache


def forbid_export(monkeypatch) -> None:
    """Any ONNX export from here on fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.onnx.export called: the baked graph was not used")

    monkeypatch.setattr(torch.onnx, "export", refuse)


def bake(model: Path, capsys, *extra: str) -> dict:
    assert cli(["graph", "bake", "--model", str(model), *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_bake_writes_the_graph_into_the_model_folder_under_its_key(model_copy, capsys):
    info = bake(model_copy, capsys)
    folder = model_copy / BAKED_DIR / info["digest"]
    assert info["baked"] is True and Path(info["path"]) == folder / GRAPH_FILE
    assert json.loads((folder / KEY_FILE).read_text()) == info["key"]
    probe = Embedder(str(model_copy), device="cpu", backend="torch")
    assert info["key"] == probe.graph_key.to_dict() and info["digest"] == probe.graph_key.digest
    # the image bakes as root and serves as another user: everything must be readable by others
    for path in (folder, folder / GRAPH_FILE, folder / KEY_FILE):
        assert path.stat().st_mode & 0o004, oct(path.stat().st_mode)
    # hidden: `embedkit info` prints the same content hash after baking
    assert cli(["info", str(model_copy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["content_hash"] == info["key"]["content_hash"]
    # baking again finds the baked graph and leaves it in place
    again = bake(model_copy, capsys)
    assert again["digest"] == info["digest"] and again["source"] == info["path"]
    # the packed graph for merged server batches, baked beside it where OpenVINO runs it
    if openvino_version() is None:
        assert info["packed"]["baked"] is False and "OpenVINO" in info["packed"]["reason"]
    else:
        packed = model_copy / BAKED_DIR / probe.packed_key.digest
        assert info["packed"] == {"baked": True, "path": str(packed / GRAPH_FILE)}
        assert json.loads((packed / KEY_FILE).read_text()) == probe.packed_key.to_dict()
        assert all(p.stat().st_mode & 0o004 for p in (packed, packed / GRAPH_FILE, packed / KEY_FILE))


@pytest.mark.parametrize("backend", ["onnx", "auto"])
def test_a_fresh_engine_with_an_empty_cache_uses_the_baked_graph(
    backend, tmp_path, model_copy, capsys, monkeypatch
):
    # baked with the session's cache; the engine below starts with an empty one and cannot export
    info = bake(model_copy, capsys, "--into", str(model_copy))
    empty_cache = fresh_cache(monkeypatch, tmp_path)
    forbid_export(monkeypatch)
    emb = Embedder(str(model_copy), device="cpu", backend=backend, packed=True)
    assert "export" not in emb.backend_note, emb.backend_note
    assert emb.crossover is not None or backend == "onnx"  # auto timed the graph it opened
    if backend == "auto" and openvino_version() is not None:  # and found the baked packed graph
        assert emb.packed_path == Path(info["packed"]["path"])
    if backend == "onnx":
        assert emb.graph_path == Path(info["path"])
        reference = Embedder(str(model_copy), device="cpu", backend="torch").encode(TEXTS)
        np.testing.assert_allclose(emb.encode(TEXTS), reference, atol=1e-5)
    assert not (empty_cache / "graphs").exists()  # nothing exported into the cache


def test_a_graph_baked_for_other_weights_is_ignored_and_a_fresh_one_exported(
    tmp_path, model_copy, tiny_embedder, capsys, monkeypatch
):
    empty_cache = fresh_cache(monkeypatch, tmp_path)
    old = bake(model_copy, capsys)
    stale = model_copy / BAKED_DIR / old["digest"]
    # new weights, same architecture and tokenizer: the content hash changes
    other = build_tiny_bert(tmp_path / "other-weights", seed=1)
    shutil.copyfile(other / "model.safetensors", model_copy / "model.safetensors")
    fresh_key = Embedder(str(model_copy), device="cpu", backend="torch").graph_key
    assert fresh_key.content_hash != old["key"]["content_hash"]
    # even filed under the new key's name, a graph whose key.json names other weights is not used
    shutil.copytree(stale, model_copy / BAKED_DIR / fresh_key.digest)
    emb = Embedder(str(model_copy), device="cpu", backend="onnx")
    assert emb.graph_path == empty_cache / "graphs" / fresh_key.digest / GRAPH_FILE
    torch_vecs = Embedder(str(model_copy), device="cpu", backend="torch").encode(TEXTS)
    np.testing.assert_allclose(emb.encode(TEXTS), torch_vecs, atol=1e-5)
    # and the stale graph would have been wrong: the old weights give other vectors
    assert not np.allclose(tiny_embedder.encode(TEXTS), torch_vecs, atol=1e-3)


def test_bake_of_a_clip_model_says_why_not_and_exits_1(tiny_clip, capsys):
    assert cli(["graph", "bake", "--model", str(tiny_clip)]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["baked"] is False and "CLIP" in info["reason"]
    assert not (tiny_clip / ".embedkit").exists()


def _members(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        return set(tar.getnames())


def test_package_model_bakes_the_graph_and_a_server_started_from_the_archive_uses_it(
    tmp_path, model_copy, tiny_embedder, capsys
):
    archive = tmp_path / "out" / "model.tar.gz"
    assert cli(["sagemaker", "package-model", str(model_copy), str(archive)]) == 0
    info = json.loads(capsys.readouterr().out)
    digest = info["graph"]["digest"]
    assert info["graph"]["baked"] is True
    names = _members(archive)
    graph_members = {f".embedkit/graphs/{digest}/{GRAPH_FILE}", f".embedkit/graphs/{digest}/{KEY_FILE}"}
    assert graph_members <= names and {"modules.json", "config.json", "model.safetensors"} <= names
    assert not any(n.startswith(("/", "..", "model/")) for n in names)  # model files at the root
    assert not (model_copy / ".embedkit").exists()  # the source folder is left as it was

    plain = tmp_path / "out" / "plain.tar.gz"
    assert cli(["sagemaker", "package-model", str(model_copy), str(plain), "--no-bake-graph"]) == 0
    assert json.loads(capsys.readouterr().out)["graph"] == {"baked": False, "reason": "--no-bake-graph"}
    assert not any(n.startswith(".embedkit") for n in _members(plain))

    # SageMaker unpacks the archive into /opt/ml/model of a fresh container: an empty cache
    opt_ml = tmp_path / "opt" / "ml" / "model"
    opt_ml.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(opt_ml, filter="data")
    cache = tmp_path / "container-cache"
    env = {"EMBEDKIT_CACHE_DIR": str(cache), "SM_MODEL_DIR": str(opt_ml)}
    with ServerProcess(["--backend", "onnx"], env=env, log_dir=tmp_path) as srv:
        got = httpx.post(srv.url + "/invocations", json={"inputs": TEXTS}, timeout=30).json()["embeddings"]
        log = srv.log()
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), tiny_embedder.encode(TEXTS), atol=1e-5)
    assert not (cache / "graphs").exists(), log  # served from the baked graph: nothing exported
    assert "exported the ONNX graph" not in log and "using torch for every batch" not in log, log

"""Model resolution (default, dirs, archives, S3, hub ids) and description."""

from __future__ import annotations

import tarfile
import time

import numpy as np
import pytest

from embedkit import Embedder
from embedkit.errors import ModelLoadError, ModelNotFoundError
from embedkit.models import content_hash, default_model_path, load_text_model, resolve_model


def _tar_model(model_dir, archive):
    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted(model_dir.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(model_dir)))
    return archive


def test_default_aliases_resolve_to_the_packaged_model():
    for spec in ("default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", None):
        assert resolve_model(spec) == default_model_path()


def test_unknown_hub_id_fails_fast_with_instructions():
    t0 = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("BAAI/bge-m3")
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "never downloads" in msg and "--model" in msg and "s3://" in msg


def test_missing_local_path_is_not_found():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model("./no/such/model/dir")


def test_local_tar_gz_unpacks_into_content_addressed_cache(tiny_model, tmp_path):
    archive = _tar_model(tiny_model, tmp_path / "model.tar.gz")
    first = resolve_model(str(archive))
    again = resolve_model(str(archive))
    assert first == again and (first / "config.json").is_file()
    texts = ["hello world"]
    assert np.abs(Embedder(str(first)).encode(texts) - Embedder(str(tiny_model)).encode(texts)).max() == 0


def test_archive_with_path_traversal_is_refused(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "x.txt"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../../escape.txt")
    with pytest.raises(ModelLoadError, match="leaves the model dir"):
        resolve_model(str(evil))


def test_s3_model_tar_gz_and_prefix_resolve_through_moto(tiny_model, tmp_path, s3_bucket, moto_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_server)
    archive = _tar_model(tiny_model, tmp_path / "model.tar.gz")
    s3.upload_file(str(archive), s3_bucket, "models/tiny/model.tar.gz")
    for p in tiny_model.rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), s3_bucket, f"unpacked/{p.relative_to(tiny_model)}")
    from_tar = resolve_model(f"s3://{s3_bucket}/models/tiny/model.tar.gz")
    from_prefix = resolve_model(f"s3://{s3_bucket}/unpacked/")
    ref = Embedder(str(tiny_model)).encode(["hello world"])
    for path in (from_tar, from_prefix):
        assert np.abs(Embedder(str(path)).encode(["hello world"]) - ref).max() == 0
    assert resolve_model(f"s3://{s3_bucket}/models/tiny/model.tar.gz") == from_tar
    with pytest.raises(ModelNotFoundError):
        resolve_model(f"s3://{s3_bucket}/models/missing.tar.gz")


def test_sagemaker_layout_with_code_dir_is_found(tiny_model, tmp_path):
    import shutil

    root = tmp_path / "opt-ml-model"
    shutil.copytree(tiny_model, root)
    (root / "code").mkdir()
    (root / "code" / "inference.py").write_text("# custom handler\n")
    assert resolve_model(str(root)) == root


def test_content_hash_changes_with_weights_and_is_stable(tiny_model, tmp_path):
    import shutil

    h1 = content_hash(tiny_model)
    assert h1 == content_hash(tiny_model) and h1.startswith("sha256:")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert content_hash(copy) == h1
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert content_hash(copy) != h1


def test_model_description_of_default_model():
    m = load_text_model(default_model_path())
    assert (m.dimension, m.max_seq_length, m.pooling, m.normalize) == (384, 256, "mean", True)
    assert m.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert 22_000_000 < m.num_parameters < 23_000_000


def test_unsupported_module_type_is_named(tiny_model, tmp_path):
    import json
    import shutil

    path = tmp_path / "odd"
    shutil.copytree(tiny_model, path)
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": 9, "name": "9", "path": "", "type": "sentence_transformers.models.LSTM"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="LSTM"):
        load_text_model(path)


def test_model_directory_is_where_code_lives_for_dirs_and_archives(tiny_model, tmp_path):
    import shutil

    from embedkit.models.resolve import model_directory

    assert model_directory("default") is None and model_directory("org/some-model") is None  # no dir
    root = tmp_path / "packaged"
    shutil.copytree(tiny_model, root / "model")  # weights one level down, code/ at the top
    (root / "code").mkdir()
    (root / "code" / "inference.py").write_text("# custom handler\n")
    assert model_directory(str(root)) == root
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted(root.iterdir()):
            tar.add(p, arcname=p.name)
    top = model_directory(str(archive))
    assert (top / "code" / "inference.py").is_file() and model_directory(str(archive)) == top
    assert resolve_model(str(archive)) == top / "model"  # the weights, as before
    with pytest.raises(ModelNotFoundError):
        model_directory(str(tmp_path / "absent"))

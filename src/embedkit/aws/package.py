"""Package a model as SageMaker's ``model.tar.gz``: the model files at the archive root (what lands in
``/opt/ml/model``), plus an optional ``code/inference.py`` and ``code/requirements.txt``, and by
default the model's ONNX graph baked in as ``.embedkit/graphs/<digest>/`` (see
:mod:`embedkit.engine.bake`), so a serverless cold start does not export one.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> info = package_model("default", os.path.join(d, "model.tar.gz"))
>>> "modules.json" in info["members"] and info["destination"].endswith("model.tar.gz")
True
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from embedkit.aws import s3
from embedkit.errors import ConfigError

log = logging.getLogger(__name__)


def _add_tree(
    tar: tarfile.TarFile, root: Path, prefix: str = "", skip_top: tuple[str, ...] = ()
) -> list[str]:
    names = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        top = Path(folder) == root
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".git") and not (top and d in skip_top))
        for name in sorted(files):
            full = Path(folder) / name
            arc = prefix + full.relative_to(root).as_posix()
            tar.add(str(full.resolve()), arcname=arc, recursive=False)
            names.append(arc)
    return names


def package_model(
    model: str,
    destination: str,
    *,
    inference: str | None = None,
    requirements: str | None = None,
    code_dir: str | None = None,
    bake_graph: bool = True,
) -> dict[str, Any]:
    """Write ``model`` (any spec :func:`embedkit.resolve_model` accepts) as a SageMaker
    ``model.tar.gz`` to ``destination`` (local or ``s3://``), with ``inference`` as
    ``code/inference.py``, ``requirements`` as ``code/requirements.txt``, ``code_dir`` as ``code/``
    and (``bake_graph``) the ONNX graph, or a warning why not. Returns what was written."""
    from embedkit.engine.bake import bake_graph as bake
    from embedkit.engine.graph import BAKED_DIR
    from embedkit.models import resolve_model

    root = Path(resolve_model(model))
    for label, path in (("--inference", inference), ("--requirements", requirements)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{label} {path} does not exist")
    if code_dir and not os.path.isdir(code_dir):
        raise ConfigError(f"--code-dir {code_dir} is not a folder")
    if not destination.endswith(".tar.gz"):
        raise ConfigError(f"the destination must end in .tar.gz (SageMaker's layout), got {destination!r}")
    tmp = tempfile.mkdtemp(prefix="embedkit-package-")
    try:
        graph: dict[str, Any] = {"baked": False, "reason": "--no-bake-graph"}
        if bake_graph:
            graph = bake(str(root), Path(tmp) / "baked")
            if not graph["baked"]:
                log.warning("model.tar.gz without an ONNX graph: %s", graph["reason"])
        archive = os.path.join(tmp, "model.tar.gz")
        with tarfile.open(archive, "w:gz") as tar:
            # New code replaces any code/ folder the model already carries; a fresh graph its graphs.
            skip = ("code",) if (code_dir or inference or requirements) else ()
            skip += (BAKED_DIR.split("/")[0],) if graph["baked"] else ()
            members = _add_tree(tar, root, skip_top=skip)
            if graph["baked"]:
                members += _add_tree(tar, Path(tmp) / "baked")
            if code_dir:
                members += _add_tree(tar, Path(code_dir), "code/")
            if inference:
                tar.add(inference, arcname="code/inference.py")
                members.append("code/inference.py")
            if requirements:
                tar.add(requirements, arcname="code/requirements.txt")
                members.append("code/requirements.txt")
        digest = hashlib.sha256(Path(archive).read_bytes()).hexdigest()
        size = os.path.getsize(archive)
        if s3.is_s3(destination):
            s3.upload_file(archive, destination)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
            shutil.copyfile(archive, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "model": model,
        "source": str(root),
        "destination": destination,
        "bytes": size,
        "sha256": digest,
        "members": sorted(set(members)),
        "graph": {k: graph[k] for k in ("baked", "digest", "reason") if k in graph},
    }

"""Bake a model's ONNX graph next to its weights (``<model>/.embedkit/graphs/<digest>/``), so a
fresh container (a serverless cold start) finds it instead of exporting one (docs/backends.md).

>>> info = bake_graph("default", into="/tmp/baked")  # doctest: +SKIP
>>> info["path"]  # doctest: +SKIP
'/tmp/baked/.embedkit/graphs/3f1c.../model.onnx'
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from embedkit.engine.graph import BAKED_DIR, GRAPH_FILE, SUPPORTED_MODEL_TYPES, runtime_version

log = logging.getLogger(__name__)


def _why_not(path: Path) -> str | None:
    """Why ``path`` gets no graph, decided before loading weights; ``None`` when it may."""
    from embedkit.models.clip import is_clip_dir

    if runtime_version() is None:
        return "onnxruntime (or onnx) is not installed"
    if is_clip_dir(path):
        return "CLIP models have no ONNX export here (text models of the BERT family, XLM-RoBERTa, MPNet)"
    return None


def _install(source: Path, target: Path) -> None:
    """Copy the graph folder ``source`` to ``target`` through a temporary folder and a rename, readable
    by every user (the image bakes as root and serves as another user)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bake-", dir=target.parent))
    try:
        for item in sorted(source.iterdir()):
            if item.is_file():
                shutil.copyfile(item, tmp / item.name)
                os.chmod(tmp / item.name, 0o644)
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def bake_graph(
    model: str | Path = "default", into: str | Path | None = None, *, pooling: str | None = None
) -> dict[str, Any]:
    """Write ``model``'s fp32 ONNX graph (found where the engine would find it, or exported now) into
    ``into/.embedkit/graphs/<digest>/`` (default: the model directory). Returns ``baked`` and either
    ``key``, ``digest``, ``path``, ``source``, ``seconds`` and ``packed`` (the packed graph for
    merged server batches, baked beside it where OpenVINO is installed: ``baked`` and ``path`` or
    ``reason``), or ``reason`` (why not)."""
    from embedkit.engine.embedder import Embedder
    from embedkit.models import load_text_model, resolve_model

    t0 = time.perf_counter()
    path = Path(resolve_model(str(model)))
    why = _why_not(path)
    text_model = None
    if why is None:
        text_model = load_text_model(path, pooling=pooling)
        if text_model.model_type not in SUPPORTED_MODEL_TYPES:
            why = f"model type {text_model.model_type or 'unknown'!r} has no ONNX export here"
    if why is not None:
        return {"baked": False, "model": str(model), "reason": why}
    packed, packed_why = _packed_source(text_model)  # exported before the engine fuses the model
    emb = Embedder(text_model, device="cpu", precision="fp32", backend="onnx")
    try:
        source = emb.graph_path
        if source is None:
            return {"baked": False, "model": str(model), "reason": emb.backend_note}
        key = emb.graph_key
        root = Path(into) if into is not None else Path(emb.model.path)
        path = _bake_into(source, root)
        packed_info: dict[str, Any] = (
            {"baked": True, "path": str(_bake_into(packed, root))}
            if packed is not None
            else {"baked": False, "reason": packed_why}
        )
    finally:
        emb.close()
    seconds = time.perf_counter() - t0
    log.info("baked the ONNX graph %s into %s in %.1fs", key.digest, path.parent, seconds)
    return {
        "baked": True,
        "model": str(model),
        "model_path": str(emb.model.path),
        "key": key.to_dict(),
        "digest": key.digest,
        "path": str(path),
        "source": str(source),
        "seconds": round(seconds, 3),
        "packed": packed_info,
    }


def _bake_into(graph: Path, root: Path) -> Path:
    """Install the folder of ``graph`` (``<digest>/model.onnx``, found or exported) under ``root``'s
    baked graphs, unless it is already there; the baked graph's path."""
    target = root / BAKED_DIR / graph.parent.name
    if target.resolve() != graph.parent.resolve():
        _install(graph.parent, target)
    return target / GRAPH_FILE


def _packed_source(text_model: Any) -> tuple[Path | None, str | None]:
    """The packed graph of ``text_model`` (engine/packed.py; merged server batches of mixed
    lengths) found where the engine would find it or exported now, or ``None`` and why not."""
    from embedkit.engine.graph import openvino_version
    from embedkit.engine.packed import find_or_export_packed, packed_unavailable
    from embedkit.models import content_hash

    if openvino_version() is None:
        return (
            None,
            "OpenVINO, which runs the packed graph, is not installed (pip install 'embedkit[openvino]')",
        )
    why = packed_unavailable(text_model.transformer, text_model.pooling)
    if why is not None:
        return None, why
    try:
        return find_or_export_packed(text_model, content_hash(text_model.path)), None
    except Exception as exc:
        return None, f"the packed graph's export failed ({type(exc).__name__}: {str(exc)[:200]})"

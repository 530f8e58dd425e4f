"""ONNX graphs of a text model: export, the cache keyed by what the graph computes, and a session.

The graph is exported locally from the loaded model (never downloaded) and computes what the torch
path computes up to normalisation: transformer, pooling and any Dense layers, one float32 vector per
input. It is found, in order, baked into the model directory (``<model>/.embedkit/graphs/<key>/``,
written by ``embedkit graph bake`` and ``embedkit sagemaker package-model``; hidden, so the model's
content hash is unchanged) or in the cache (``$EMBEDKIT_CACHE_DIR/graphs/<key>/``), else exported
into the cache. The key covers the model's content hash, the precision, the graph's outputs and the
runtime's version, so a graph is never reused for different weights, outputs or runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedkit.errors import ConfigError
from embedkit.models import cache_dir
from embedkit.models.pooling import pool

log = logging.getLogger(__name__)

# Bump when what the exported graph computes, or how it is exported, changes.
GRAPH_FORMAT = 1
OPSET = 17
BAKED_DIR = ".embedkit/graphs"
GRAPH_FILE = "model.onnx"
KEY_FILE = "key.json"
# Model families whose graphs are exported and checked (fp32 within 1e-5 of sentence-transformers).
SUPPORTED_MODEL_TYPES = ("bert", "xlm-roberta", "roberta", "mpnet", "camembert", "distilbert")


def runtime_version() -> str | None:
    """``onnxruntime-<version>``, or ``None`` when ONNX Runtime (or the exporter's onnx) is missing.

    onnx is only looked for, not imported: importing it costs ~1 s at start-up, and only an export
    needs it (a baked or cached graph does not)."""
    if importlib.util.find_spec("onnx") is None:
        return None
    try:
        import onnxruntime
    except ImportError:
        return None
    return f"onnxruntime-{onnxruntime.__version__}"


@dataclass(frozen=True)
class GraphKey:
    """What a graph was made from and computes; its digest names the graph's folder."""

    content_hash: str
    precision: str
    outputs: str
    runtime: str
    format: int = GRAPH_FORMAT

    @property
    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def graph_outputs(pooling: str, dense_layers: int) -> str:
    """The outputs a text model's graph computes, as written into its key."""
    return f"sentence_embedding(pooling={pooling},dense={dense_layers})"


class _Pooled(torch.nn.Module):
    """Transformer + pooling + Dense: the torch path's forward, minus normalisation."""

    def __init__(self, transformer: torch.nn.Module, pooling: str, dense: list[torch.nn.Module]) -> None:
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling
        self.dense = torch.nn.ModuleList(dense)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        vecs = pool(self.pooling, hidden, attention_mask)
        for layer in self.dense:
            vecs = layer(vecs)
        return vecs


@contextlib.contextmanager
def _eager_attention(model: torch.nn.Module):
    """Export the plain attention pattern (ONNX Runtime fuses it); restore the model's own after."""
    setter = getattr(model, "set_attn_implementation", None)
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if setter is None or before in (None, "eager"):
        yield
        return
    try:
        setter("eager")
    except Exception:  # a model that has only one implementation
        yield
        return
    try:
        yield
    finally:
        setter(before)


def find_graph(key: GraphKey, model_dir: Path | None) -> Path | None:
    """A graph for ``key`` baked into ``model_dir``, else one in the cache, else ``None``."""
    places = [Path(model_dir) / BAKED_DIR] if model_dir is not None else []
    places.append(cache_dir() / "graphs")
    for root in places:
        folder = root / key.digest
        try:
            stored = json.loads((folder / KEY_FILE).read_text())
        except (OSError, ValueError):
            continue
        if stored == key.to_dict() and (folder / GRAPH_FILE).is_file():
            return folder / GRAPH_FILE
    return None


def export_graph(
    transformer: torch.nn.Module,
    pooling: str,
    dense: list[torch.nn.Module],
    key: GraphKey,
    dest_root: Path,
    *,
    pad_id: int = 0,
) -> Path:
    """Export the fp32 CPU ``transformer`` (+ pooling, Dense) to ``dest_root/<key>/model.onnx``.

    Written to a temporary folder and renamed into place, so a concurrent reader never sees half a
    graph. Returns the graph's path."""
    if runtime_version() is None:
        raise ConfigError(
            "ONNX export needs the onnx and onnxruntime packages (pip install onnxruntime onnx)"
        )
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    target = dest_root / key.digest
    wrapper = _Pooled(transformer, pooling, dense).eval()
    # A dummy batch with padding, so the traced graph keeps the attention mask's path.
    ids = torch.full((2, 8), pad_id, dtype=torch.long)
    ids[:, 0] = 5
    ids[0, 1:8] = 7
    ids[1, 1:4] = 7
    mask = (torch.arange(8)[None, :] < torch.tensor([[8], [4]])).long()
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=dest_root))
    t0 = time.perf_counter()
    try:
        with _eager_attention(transformer), torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (ids, mask),
                str(tmp / GRAPH_FILE),
                input_names=["input_ids", "attention_mask"],
                output_names=["sentence_embedding"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "tokens"},
                    "attention_mask": {0: "batch", 1: "tokens"},
                    "sentence_embedding": {0: "batch"},
                },
                opset_version=OPSET,
                dynamo=False,
            )
        (tmp / KEY_FILE).write_text(json.dumps(key.to_dict(), indent=2))
        if target.exists():  # another process finished first; its graph is as good
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported the ONNX graph in %.1fs to %s", time.perf_counter() - t0, target)
    return target / GRAPH_FILE


class GraphSession:
    """An ONNX Runtime session over a graph: ``run(input_ids, attention_mask)`` -> float32 vectors.

    Threads: ``threads`` intra-op threads that sleep when idle (as embedkit's OpenMP threads do,
    so the two runtimes and the server's own threads never spin against each other)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.path = Path(path)
        self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

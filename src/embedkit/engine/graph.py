"""ONNX graphs of a text model: export, the cache keyed by what the graph computes, and a session.

The graph (transformer, pooling, Dense layers; no normalisation) is exported locally, never
downloaded, and found baked into the model directory (``<model>/.embedkit/graphs/<key>/``), else in
``$EMBEDKIT_CACHE_DIR/graphs/<key>/``, else exported there. The key: docs/backends.md.
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
import threading
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
# 2: ONNX Runtime's transformer fusions (attention, skip layer norm, bias GELU) applied at export.
GRAPH_FORMAT = 2
OPSET = 17
BAKED_DIR = ".embedkit/graphs"
GRAPH_FILE = "model.onnx"
KEY_FILE = "key.json"
# Model families whose graphs are exported and checked (fp32 within 1e-5 of sentence-transformers).
SUPPORTED_MODEL_TYPES = ("bert", "xlm-roberta", "roberta", "mpnet", "camembert", "distilbert")


def runtime_version() -> str | None:
    """``onnxruntime-<version>``, or ``None`` when ONNX Runtime (or the exporter's onnx) is missing.
    onnx is only looked for: importing it costs ~1 s, and only an export needs it."""
    if importlib.util.find_spec("onnx") is None:
        return None
    try:
        import onnxruntime
    except ImportError:
        return None
    return f"onnxruntime-{onnxruntime.__version__}"


def openvino_version() -> str | None:
    """``openvino-<version>``, or ``None`` when OpenVINO (the ``openvino`` extra) is not installed.
    Looked for without importing it (the import costs ~0.3 s)."""
    if importlib.util.find_spec("openvino") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"openvino-{version('openvino')}"
    except PackageNotFoundError:
        return None


def openvino_runtime(precision: str) -> str:
    """What an :class:`OpenVINOSession` computing in ``precision`` names itself (``runtime``): the
    version and the precision, as kept measurements are keyed."""
    return f"{openvino_version() or 'openvino'}-{precision}"


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


def graph_outputs(pooling: str, dense_layers: int, token_states: bool = False) -> str:
    """The outputs a text model's graph computes, as written into its key (``token_states``: the
    last hidden states too, for BGE-M3's sparse and ColBERT heads)."""
    tokens = "+token_embeddings" if token_states else ""
    return f"sentence_embedding(pooling={pooling},dense={dense_layers}){tokens}"


class _Pooled(torch.nn.Module):
    """Transformer + pooling + Dense: the torch path's forward, minus normalisation."""

    def __init__(
        self, transformer: torch.nn.Module, pooling: str, dense: list[torch.nn.Module], token_states: bool
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling
        self.dense = torch.nn.ModuleList(dense)
        self.token_states = token_states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        vecs = pool(self.pooling, hidden, attention_mask)
        for layer in self.dense:
            vecs = layer(vecs)
        return (vecs, hidden) if self.token_states else vecs


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
        if _holds(root / key.digest, key):
            return root / key.digest / GRAPH_FILE
    return None


def _holds(folder: Path, key: GraphKey) -> bool:
    """Whether ``folder`` holds a graph written for exactly ``key``."""
    try:
        stored = json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stored == key.to_dict() and (folder / GRAPH_FILE).is_file()


def place_graph(tmp: Path, target: Path, key: GraphKey) -> None:
    """Write ``key`` into the freshly exported folder ``tmp`` and rename it to ``target``, so a
    concurrent reader never sees half a graph; when another process finished first, its graph is as
    good and ``tmp`` goes; a stale or broken folder under the same digest is replaced."""
    (tmp / KEY_FILE).write_text(json.dumps(key.to_dict(), indent=2))
    if _holds(target, key):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def export_graph(
    transformer: torch.nn.Module,
    pooling: str,
    dense: list[torch.nn.Module],
    key: GraphKey,
    dest_root: Path,
    *,
    pad_id: int = 0,
    token_states: bool = False,
) -> Path:
    """Export the fp32 CPU ``transformer`` (+ pooling, Dense) to ``dest_root/<key>/model.onnx``;
    with ``token_states`` the graph also outputs ``token_embeddings`` (the last hidden states).

    Written to a temporary folder and renamed into place, so a concurrent reader never sees half a
    graph. Returns the graph's path."""
    if runtime_version() is None:
        raise ConfigError(
            "ONNX export needs the onnx and onnxruntime packages (pip install onnxruntime onnx)"
        )
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    target = dest_root / key.digest
    wrapper = _Pooled(transformer, pooling, dense, token_states).eval()
    outputs = ["sentence_embedding", *(["token_embeddings"] if token_states else [])]
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
                output_names=outputs,
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "tokens"},
                    "attention_mask": {0: "batch", 1: "tokens"},
                    "sentence_embedding": {0: "batch"},
                    "token_embeddings": {0: "batch", 1: "tokens"},
                },
                opset_version=OPSET,
                dynamo=False,
            )
        config = getattr(transformer, "config", None)
        heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
        vocab = getattr(config, "vocab_size", 0)
        fused = 0
        if heads and hidden and vocab:
            fused = fuse_graph(
                tmp / GRAPH_FILE,
                num_heads=int(heads),
                hidden_size=int(hidden),
                vocab_size=int(vocab),
                pad_id=pad_id,
            )
        place_graph(tmp, target, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "exported the ONNX graph (%d fused operators) in %.1fs to %s", fused, time.perf_counter() - t0, target
    )
    return target / GRAPH_FILE


def _probe_inputs(pad_id: int, vocab_size: int) -> list[dict[str, np.ndarray]]:
    """Inputs the fused graph is checked on: padded rows, one row, and a longer batch."""
    rng = np.random.default_rng(0)
    out = []
    low, high = min(5, vocab_size - 1), max(6, min(vocab_size, 1000))
    for rows, tokens in ((2, 8), (1, 5), (3, 40)):
        ids = rng.integers(low, high, size=(rows, tokens), dtype=np.int64)
        lengths = np.linspace(tokens, max(2, tokens // 3), rows).astype(int)
        mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
        ids[mask == 0] = pad_id
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def fuse_graph(
    path: Path, *, num_heads: int, hidden_size: int, vocab_size: int, pad_id: int = 0, tol: float = 1e-5
) -> int:
    """Rewrite the graph at ``path`` with ONNX Runtime's transformer fusions when they keep its
    outputs within ``tol``. Returns the number of fused operators (0: left unchanged, reason logged)."""
    import onnxruntime as ort

    try:
        from onnxruntime.transformers import optimizer
    except Exception as exc:  # pragma: no cover - shipped with onnxruntime
        log.info("ONNX Runtime's transformer optimizer is unavailable (%s); graph left unfused", exc)
        return 0
    path = Path(path)
    fused_path = path.with_name("fused.onnx")
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            model = optimizer.optimize_model(
                str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0
            )
            stats = model.get_fused_operator_statistics()
            fused = sum(int(v) for k, v in stats.items() if not k.startswith("QOrdered"))
            if fused == 0:
                log.info("ONNX Runtime found nothing to fuse in this graph; left unfused")
                return 0
            model.save_model_to_file(str(fused_path))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        candidate = ort.InferenceSession(str(fused_path), so, providers=["CPUExecutionProvider"])
        worst = 0.0
        for feeds in _probe_inputs(pad_id, vocab_size):
            for a, b in zip(plain.run(None, feeds), candidate.run(None, feeds), strict=True):
                mask = feeds["attention_mask"][..., None] if a.ndim == 3 else 1  # padded token states vary
                diff = np.abs(a - b) * mask if a.shape == b.shape else np.array(np.inf)
                worst = max(worst, float(np.max(diff)))
        if not worst <= tol:
            log.info("the fused graph moved outputs by %.2g (> %.0e); left unfused", worst, tol)
            return 0
        os.replace(fused_path, path)
        return fused
    except Exception as exc:
        log.info("ONNX Runtime's fusions failed (%s: %s); graph left unfused", type(exc).__name__, exc)
        return 0
    finally:
        fused_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet():
    """Silence INFO logging while ONNX Runtime's optimizer logs every fusion."""
    before = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(before)


class GraphSession:
    """An ONNX Runtime session over a graph: ``run(input_ids, attention_mask)`` -> float32 vectors.
    Its ``threads`` intra-op threads spin only while a run lasts (docs/backends.md). The graph
    runtime of fp32 engines."""

    label = "ONNX Runtime"

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")
        so.log_severity_level = 3
        self.path = Path(path)
        self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        self.token_states = "token_embeddings" in {o.name for o in self._session.get_outputs()}
        self.runtime = runtime_version() or "onnxruntime"

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self._session.run(["sentence_embedding"], feeds)[0]

    def run_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pooled vectors and the last hidden states (a graph exported with ``token_states``)."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        pooled, hidden = self._session.run(["sentence_embedding", "token_embeddings"], feeds)
        return pooled, hidden


RUNTIME_CACHE_CAPACITY = 64


def openvino_config(precision: str, threads: int) -> dict[str, Any]:
    """How embedkit compiles a graph on OpenVINO's CPU plugin, computing in ``precision``."""
    if precision not in ("bf16", "f32"):
        raise ConfigError(f"OpenVINO computes the graph in bf16 or f32 here, not {precision!r}")
    return {
        # Explicit in f32 too: on a CPU with AMX, OpenVINO's default is bf16.
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": max(1, int(threads)),
        "ENABLE_CPU_PINNING": False,
        # Compiled kernels kept per input shape. At the default (5000) a job's RSS grew by
        # 160 MiB over 20k texts (1.18x); at 64 it stayed flat at the same speed.
        "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_CAPACITY,
    }


class OpenVINOModel:
    """A graph compiled by OpenVINO's CPU plugin in ``precision`` (``INFERENCE_PRECISION_HINT``:
    ``bf16``, AMX or AVX512-BF16 kernels, or ``f32``), with one inference request.

    The request is reused behind a lock, so callers on several threads take turns (as ONNX
    Runtime's and torch's calls may overlap, a shared request would refuse: "Infer Request is
    busy"); outputs are copied out of its buffers before the lock is released. Its threads are not
    pinned to cores: torch's OpenMP threads and the event loop share them."""

    label = "OpenVINO"

    def __init__(self, path: Path, threads: int, precision: str) -> None:
        import openvino as ov

        self.path = Path(path)
        self._compiled = ov.Core().compile_model(str(path), "CPU", openvino_config(precision, threads))
        self.precision = precision
        self.runtime = openvino_runtime(precision)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()

    def _infer(self, feeds: dict[str, np.ndarray], outputs: tuple) -> list[np.ndarray]:
        with self._lock:
            out = self._request.infer(feeds)
            return [np.array(out[o], dtype=np.float32) for o in outputs]


class OpenVINOSession(OpenVINOModel):
    """The same fp32 graph on OpenVINO (:class:`OpenVINOModel`), with :class:`GraphSession`'s
    interface; OpenVINO reads ONNX Runtime's fused operators. It computes in ``bf16``, the graph
    runtime of bf16 engines, or ``f32``, which ``auto`` may give an fp32 engine's mid-sized batches
    where it beats ONNX Runtime (docs/backends.md)."""

    def __init__(self, path: Path, threads: int, precision: str = "bf16") -> None:
        super().__init__(path, threads, precision)
        names = {name for out in self._compiled.outputs for name in out.get_names()}
        self.token_states = "token_embeddings" in names
        self._pooled = self._compiled.output("sentence_embedding")
        self._hidden = self._compiled.output("token_embeddings") if self.token_states else None

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._infer({"input_ids": input_ids, "attention_mask": attention_mask}, (self._pooled,))[0]

    def run_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pooled vectors and the last hidden states (a graph exported with ``token_states``)."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        pooled, hidden = self._infer(feeds, (self._pooled, self._hidden))
        return pooled, hidden

"""The engine: texts in, vectors out, identical to sentence-transformers in fp32.

Three stages, as infinity splits them: *pre* (validate, tokenise once, length-sort, token-budget
batches, pad), *core* (the transformer under the chosen precision) and *post* (pool, dense,
normalise, Matryoshka slice). Padding of the next batch runs in a helper thread while the model runs
the current one; in :meth:`Embedder.encode_iter` the next chunk is tokenised meanwhile too.

>>> from embedkit import Embedder
>>> emb = Embedder("default")
>>> vecs = emb.encode(["a cat sits on the mat", "ein Hund im Park"])
>>> vecs.shape
(2, 384)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedkit.engine.backend import (
    COST_SHAPES,
    EVERY_BATCH,
    Crossover,
    available_memory_bytes,
    crossover_path,
    load_crossover,
    measure_crossover,
    measure_forward_cost,
    resolve_backend,
    save_crossover,
    second_copy_fits,
)
from embedkit.engine.batching import pad_batch, plan_batches
from embedkit.engine.device import attention_cells_budget, auto_batch_tokens, cpu_supports_bf16
from embedkit.engine.graph import (
    SUPPORTED_MODEL_TYPES,
    GraphKey,
    GraphSession,
    OpenVINOSession,
    export_graph,
    find_graph,
    graph_outputs,
    openvino_runtime,
    openvino_version,
    runtime_version,
)
from embedkit.engine.multi import DENSE_ONLY, MultiVectors, check_outputs, sparse_from_token_weights
from embedkit.engine.packed import (
    PackedSession,
    find_or_export_packed,
    packed_inputs,
    packed_key,
    packed_unavailable,
    position_offset,
)
from embedkit.engine.runner import Batch, ModelRunner, Workload
from embedkit.engine.tokenize import TextTokenizer, Tokenized, validate_texts
from embedkit.engine.unpad import UnpaddedEncoder
from embedkit.errors import ConfigError, InputError, OutOfMemoryError
from embedkit.models import ModelInfo, TextModel, cache_dir, content_hash, load_text_model, resolve_model
from embedkit.models.pooling import pool

log = logging.getLogger(__name__)


@dataclass
class EncodeResult:
    """Vectors plus what happened on the way (tokens per input, which inputs were truncated)."""

    embeddings: np.ndarray
    token_counts: np.ndarray
    truncated: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.token_counts.sum())

    @property
    def num_truncated(self) -> int:
        return int(self.truncated.sum())


def _parse_budget(value: int | str | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("", "0", "auto"):
            return None
        value = int(v)
    if value < 0:
        raise ConfigError(f"max_batch_tokens must be >= 0 (0 or 'auto' = automatic), got {value}")
    return int(value) or None


class Embedder:
    """Embed texts with one model on one device at one precision.

    The arguments are tabled in docs/python-api.md ("Embedder"); beyond them, ``cpu_fusion`` fuses
    linear layers (and Linear+GELU) into oneDNN kernels on CPU (fp32/bf16, see
    :mod:`embedkit.engine.cpu_fusion`), and ``unpad`` runs a BERT-family model's dense layers on
    real tokens only (see :mod:`embedkit.engine.unpad`). Backends agree within 1e-5, not bit for bit (see
    :mod:`embedkit.engine.backend`).

    The engine reads no environment variable: ``EMBEDKIT_*`` settings are resolved by
    :mod:`embedkit.settings` and passed in (:func:`embedkit.engine.build_embedder`).
    """

    def __init__(
        self,
        model: str | Path | TextModel = "default",
        *,
        device: str = "auto",
        precision: str = "fp32",
        max_batch_tokens: int | str | None = "auto",
        max_batch_size: int | None = None,
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool = True,
        prompt_name: str | None = None,
        pooling: str | None = None,
        num_threads: int | None = None,
        backend: str | None = None,
        defer_graph: bool = False,
        cpu_fusion: bool = True,
        unpad: bool = True,
        packed: bool = False,
    ) -> None:
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.spec = str(model) if not isinstance(model, TextModel) else str(model.path)
        if isinstance(model, TextModel):
            self.model = model
        else:
            self.model = load_text_model(resolve_model(model), pooling=pooling)
        # Devices, precision, replicas, OOM retries and the spread over devices: see engine/runner.py.
        runner = self.runner = ModelRunner(device, precision)
        self.devices, self.device, self.precision = runner.devices, runner.device, runner.precision
        self.normalize = self.model.normalize if normalize is None else bool(normalize)
        self.truncate = truncate
        self.cpu_fusion = bool(cpu_fusion)
        self.unpad = bool(unpad)
        self.max_batch_size = int(max_batch_size) if max_batch_size else None
        self.prompt_name = prompt_name
        if prompt_name is not None and prompt_name not in self.model.prompts:
            raise ConfigError(
                f"prompt_name {prompt_name!r} is not defined by the model; it defines: "
                f"{sorted(self.model.prompts) or 'no prompts'}"
            )
        self.dimensions = self._check_dimensions(dimensions)
        self.tokenizer = TextTokenizer(
            self.model.tokenizer, self.model.max_seq_length, do_lower_case=self.model.do_lower_case
        )
        self.backend = resolve_backend(backend)
        self._hash: str | None = None
        self.backend_note = ""
        graph = self._find_or_export_graph()
        # Merged server batches of mixed lengths in one pass (engine/packed.py): with ``packed``
        # (servers ask for it) the graph is found or exported here, from the unfused fp32 model;
        # open_packed compiles it and the server keeps it where it measures faster.
        self.packed: PackedSession | None = None
        self.packed_note = "length groups (the packed graph was not asked for)"
        self.packed_path = self._find_or_export_packed(graph is not None) if packed else None
        self._prepare_model()
        self.fused_modules = self.runner.fused_modules
        cfg = self.model.transformer.config
        explicit = _parse_budget(max_batch_tokens)
        self.auto_budget = explicit is None
        self.max_batch_tokens = explicit or auto_batch_tokens(
            self.device,
            int(getattr(cfg, "hidden_size", 768)),
            int(getattr(cfg, "num_hidden_layers", 12)),
            int(getattr(cfg, "num_attention_heads", 12)),
            self.precision,
        )
        # Attention scores grow with the square of the length: a second bound, in query-key cells
        # per batch, keeps one 8192-token text (alone) and a batch of short ones both in memory.
        self.max_attention_cells = attention_cells_budget(
            self.device, int(getattr(cfg, "num_attention_heads", 12)), available_memory_bytes()
        )
        self.stats = self.runner.stats
        self._onnx: GraphSession | OpenVINOSession | None = None
        # fp32 with auto and OpenVINO installed: OpenVINO on the same graph for the graph's batches
        # above max_ort_tokens padded tokens (where auto measured it faster than ONNX Runtime).
        self._openvino: OpenVINOSession | None = None
        self._pending_openvino: OpenVINOSession | None = None
        # a three-way plan kept from an earlier start that gave OpenVINO no batch: applied as is,
        # without compiling OpenVINO (open_graph)
        self._kept_without_openvino: Crossover | None = None
        self.max_ort_tokens = EVERY_BATCH
        self.graph_path: Path | None = None
        self.onnx_max_tokens = 0
        self.crossover: Crossover | None = None
        # What one more forward pass costs, in padded tokens' worth of compute, on the runtime that
        # takes small batches (from auto's measurement; None when nothing was measured). The server
        # uses it to decide when splitting merged requests by length saves more padding than the
        # extra pass costs. Set once with the measurement, not per batch.
        self.forward_cost_tokens: float | None = None
        # torch (on CPU) runs batches of at most this many padded tokens on one thread, where
        # measure_forward_cost found that faster than all of them (0: every batch on all threads).
        self.torch_one_thread_tokens = 0
        # With auto, a server may defer opening the graph until it already answers on torch (the
        # session and the measurement then stay out of its cold start); see open_graph/use_graph.
        self.pending_graph: Path | None = None
        if graph is not None and defer_graph and self.backend == "auto":
            self.pending_graph = graph
            self.backend_note = "torch until the ONNX graph is attached (deferred at start-up)"
        elif graph is not None:
            self._start_graph(graph)

    # ----------------------------------------------------------------- set-up
    def _prepare_model(self) -> None:
        """Place the model on the runner's devices (the dense layers and BGE-M3's heads run in fp32
        after it; a replica's heads are its dense layers, then the heads of :attr:`outputs`)."""
        self._transformer = self.runner.place(
            self.model.transformer,
            [*self.model.dense, *self.model.heads.values()],
            cpu_fusion=self.cpu_fusion,
            unpad=self.unpad,
        )
        n = len(self.model.dense)
        self._head_slot = {name: n + k for k, name in enumerate(self.model.heads)}
        skip = (getattr(self.model.tokenizer, f"{t}_token_id", None) for t in ("cls", "eos", "pad", "unk"))
        self._special_ids = np.array(sorted({int(i) for i in skip if i is not None}), dtype=np.int64)

    @property
    def outputs(self) -> tuple[str, ...]:
        """What this model gives: ``dense``, plus ``sparse`` and ``colbert`` for BGE-M3-style models."""
        return self.model.outputs

    # ------------------------------------------------------------ backends
    @property
    def graph_key(self) -> GraphKey:
        """What an ONNX graph of this model must have been made from (see :mod:`embedkit.engine.graph`)."""
        return GraphKey(
            content_hash=self.content_hash,
            precision="fp32",
            outputs=graph_outputs(self.model.pooling, len(self.model.dense), bool(self.model.heads)),
            runtime=runtime_version() or "none",
        )

    def _graph_unavailable(self) -> str | None:
        """Why this engine cannot run the ONNX graph (ONNX Runtime in fp32, OpenVINO in bf16, or
        OpenVINO in both with ``backend="openvino"``), or ``None`` when it can."""
        if self.backend == "torch":
            return "backend torch asked for"
        if self.device.type != "cpu" or len(self.devices) > 1:
            return f"the {self.backend} backend runs the graph on one CPU; {self.device} runs torch"
        if self.backend == "openvino" and openvino_version() is None:
            return (
                "backend openvino asked for, but OpenVINO is not installed (pip install 'embedkit[openvino]')"
            )
        if self.precision == "bf16":  # the fp32 graph, computed in bf16 by OpenVINO
            if openvino_version() is None:
                return (
                    "bf16 runs the ONNX graph on OpenVINO, which is not installed "
                    "(pip install 'embedkit[openvino]'); bf16 runs torch"
                )
            if not cpu_supports_bf16():
                return "this CPU has no native bf16 (avx512_bf16/amx) for OpenVINO; bf16 runs torch"
        elif self.precision != "fp32":
            runs = (
                "fp32 and bf16 (OpenVINO)"
                if self.backend == "openvino"
                else "fp32 (ONNX Runtime) and bf16 (OpenVINO)"
            )
            return (
                f"the graph runs {runs} only (no {self.precision} graph keeps min cosine 0.99 and "
                f"its speed); {self.precision} runs torch"
            )
        model_type = getattr(self.model, "model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            return f"model type {model_type or 'unknown'!r} has no ONNX export here"
        if runtime_version() is None:
            return "onnxruntime (or onnx) is not installed"
        if self.backend == "auto":
            weights = 4 * self.model.num_parameters
            free = available_memory_bytes()
            if not second_copy_fits(weights, free):
                free = free or 0
                return (
                    f"a second copy of the weights ({weights >> 20} MiB) does not fit beside torch's in "
                    f"the {free >> 20} MiB available; auto picked torch alone"
                )
        return None

    def _find_or_export_graph(self) -> Path | None:
        """The ONNX graph for this model (baked, cached, or exported now from the unfused fp32
        model), or ``None`` with :attr:`backend_note` saying why torch runs every batch."""
        why = self._graph_unavailable()
        if why is None:
            key = self.graph_key
            path = find_graph(key, self.model.path)
            if path is not None:
                return path
            try:
                return export_graph(
                    self.model.transformer,
                    self.model.pooling,
                    self.model.dense,
                    key,
                    cache_dir() / "graphs",
                    pad_id=self.tokenizer.pad_id,
                    token_states=bool(self.model.heads),
                )
            except Exception as exc:
                why = f"the ONNX export failed ({type(exc).__name__}: {str(exc)[:200]})"
        self.backend_note = why
        if self.backend in ("onnx", "openvino") or why.startswith(("the ONNX export", "a second copy")):
            log.warning("%s: using torch for every batch", why)
        return None

    @property
    def packed_key(self) -> GraphKey:
        """What this model's packed graph (:mod:`embedkit.engine.packed`) must have been made from."""
        return packed_key(self.content_hash, self.model.pooling, len(self.model.dense))

    def _packed_unavailable(self) -> str | None:
        """Why merged batches of mixed lengths cannot run packed here, or ``None`` when they may."""
        if self.backend != "auto":
            return f"backend {self.backend} runs every batch on its own runtime"
        if self.precision not in ("fp32", "bf16"):
            return f"{self.precision} runs torch"
        if openvino_version() is None:
            return "OpenVINO is not installed (pip install 'embedkit[openvino]')"
        return packed_unavailable(self.model.transformer, self.model.pooling)

    def _find_or_export_packed(self, graph: bool) -> Path | None:
        """The packed graph (baked, cached, or exported now) for an engine that runs the ONNX
        graph (``graph``), or ``None`` with :attr:`packed_note` saying why merged batches stay in
        length groups."""
        why = self._packed_unavailable()
        if why is None and not graph:
            why = f"no graph runs here ({self.backend_note})"
        if why is None:
            self.packed_note = "length groups until the packed graph is compiled and measured"
            try:
                return find_or_export_packed(self.model, self.content_hash)
            except Exception as exc:
                why = f"the packed graph's export failed ({type(exc).__name__}: {str(exc)[:200]})"
                log.warning("%s; merged batches stay in length groups", why)
        self.packed_note = f"length groups: {why}"
        return None

    def open_packed(self) -> PackedSession | None:
        """Compile the packed graph on OpenVINO (in f32, or bf16 for a bf16 engine) where one more
        copy of the weights fits. Runs no model, so it may run on any thread; ``None`` (with
        :attr:`packed_note` saying why) when it cannot. The server then keeps it with
        :func:`embedkit.server.batcher.adopt_packed` where it measures faster."""
        if self.packed_path is None:
            return None
        weights = 4 * self.model.num_parameters
        if not second_copy_fits(weights):
            self.packed_note = (
                f"length groups: one more copy of the weights ({weights >> 20} MiB) for the packed "
                "graph does not fit in the memory available"
            )
            log.info("%s", self.packed_note)
            return None
        precision = "bf16" if self.precision == "bf16" else "f32"
        try:
            offset = position_offset(self.model.transformer)
            return PackedSession(self.packed_path, torch.get_num_threads(), precision, offset)
        except Exception as exc:
            self.packed_note = (
                f"length groups: OpenVINO could not compile the packed graph ({type(exc).__name__}: {exc})"
            )
            log.warning("%s", self.packed_note)
            return None

    def embed_packed(
        self,
        tok: Tokenized,
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        session: PackedSession | None = None,
    ) -> np.ndarray | None:
        """``tok``'s vectors from one pass of the packed graph (``session``, default :attr:`packed`),
        rows in ``tok``'s order; ``None`` when there is no session or the batch's attention would
        exceed :attr:`max_attention_cells`."""
        session = session or self.packed
        if session is None:
            return None
        feeds = packed_inputs(tok.ids, session.offset, self.max_attention_cells)
        if feeds is None:
            return None
        norm, dims = self._post_options(normalize, dimensions)
        t0 = time.perf_counter()
        vecs = session.run(feeds)
        self.stats.add(
            model_seconds=time.perf_counter() - t0,
            batches=1,
            onnx_batches=1,
            padded_tokens=tok.num_tokens,
            texts=len(tok),
            tokens=tok.num_tokens,
            truncated=tok.num_truncated,
        )
        return np.ascontiguousarray(self._post(vecs, norm, dims))

    def _start_graph(self, path: Path) -> None:
        session = self.open_graph(path)
        if session is not None:
            self.use_graph(session)

    def open_graph(self, path: Path | None = None) -> GraphSession | OpenVINOSession | None:
        """Open the graph runtime's session for ``path`` (default: the graph this engine deferred
        with ``defer_graph=True``): ONNX Runtime in fp32, OpenVINO in bf16 (and in f32 with
        ``backend="openvino"``). With ``auto`` in fp32
        it also compiles the graph on OpenVINO in f32 where that is installed and a third copy of
        the weights fits, for :meth:`use_graph` to measure. Runs no model, so it may run on any
        thread; ``None`` (with one log line) when the session cannot be opened."""
        path = path or self.pending_graph
        if path is None:
            return None
        runtime: type[GraphSession] | type[OpenVINOSession] = GraphSession
        options: dict[str, str] = {}
        if self.precision == "bf16" or self.backend == "openvino":
            runtime, options = OpenVINOSession, {"precision": "bf16" if self.precision == "bf16" else "f32"}
        try:
            session = runtime(path, torch.get_num_threads(), **options)
        except Exception as exc:
            self.pending_graph = None
            self.backend_note = f"{runtime.label} could not open {path} ({type(exc).__name__}: {exc})"
            log.warning("%s: using torch for every batch", self.backend_note)
            return None
        why = self._openvino_f32_unavailable()
        if why is None:
            kept = load_crossover(self._kept_plan_path(session, openvino_runtime("f32")))
            if kept is not None and kept.max_ort_tokens is None:
                why = "the plan kept from an earlier start gives OpenVINO no batch"
                self._kept_without_openvino = kept
        if why is None:
            try:
                self._pending_openvino = OpenVINOSession(path, torch.get_num_threads(), precision="f32")
            except Exception as exc:  # ONNX Runtime and torch still cover every batch
                log.warning("OpenVINO could not compile %s in f32 (%s: %s)", path, type(exc).__name__, exc)
        else:
            log.debug("fp32 batches stay off OpenVINO: %s", why)
        return session

    def _openvino_f32_unavailable(self) -> str | None:
        """Why ``auto`` does not weigh OpenVINO (f32) for this fp32 engine's graph batches, or
        ``None`` when it does."""
        if self.backend != "auto" or self.precision != "fp32":
            return "only auto in fp32 weighs OpenVINO against ONNX Runtime"
        if openvino_version() is None:
            return "OpenVINO is not installed (pip install 'embedkit[openvino]')"
        weights = 4 * self.model.num_parameters
        # called once ONNX Runtime's copy is loaded, so the memory available already excludes it
        if not second_copy_fits(weights):
            return f"a third copy of the weights ({weights >> 20} MiB) does not fit in the memory available"
        return None

    def _graph_for(self, padded: int) -> GraphSession | OpenVINOSession | None:
        """The graph session that runs a batch of ``padded`` tokens, when the graph takes it."""
        if self._openvino is not None and padded > self.max_ort_tokens:
            return self._openvino
        return self._onnx

    def _probe_runs(
        self,
    ) -> tuple[
        Callable[[int, int], object],
        Callable[[GraphSession | OpenVINOSession], Callable[[int, int], object]],
    ]:
        """``run_torch(rows, tokens)``: this engine's torch forward pass on random unpadded inputs
        of that shape (first replica, on its device), and ``on_graph(session)``: the same probe
        run on a graph session."""
        config = getattr(getattr(self.model, "transformer", None), "config", None)
        vocab = int(getattr(config, "vocab_size", 1000))
        rng = np.random.default_rng(0)

        def shape(rows: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
            ids = rng.integers(min(vocab - 1, 100), vocab, size=(rows, tokens), dtype=np.int64)
            return torch.from_numpy(ids), torch.ones((rows, tokens), dtype=torch.int64)

        def run_torch(rows: int, tokens: int) -> object:
            ids, mask = shape(rows, tokens)
            device = self.runner.replicas[0].device
            to_device = self.runner.to_device
            return self._forward(to_device(ids, device), to_device(mask, device))

        def on_graph(graph: GraphSession | OpenVINOSession) -> Callable[[int, int], object]:
            def run(rows: int, tokens: int) -> object:
                ids, mask = shape(rows, tokens)
                return graph.run(ids.numpy(), mask.numpy())

            return run

        return run_torch, on_graph

    def measure_forward_cost(self) -> float | None:
        """Time the forward pass of the runtime that runs every batch (the graph's with
        ``backend="onnx"`` or ``"openvino"``, else torch) on three small shapes and keep the cost
        of one more pass in padded tokens (:attr:`forward_cost_tokens`), unless ``auto``'s measurement already set it.
        The server prices splitting merged requests into length groups with it; eager torch's
        fixed cost differs by precision and CPU (~60 tokens in fp32, ~200 in bf16 on the AMX
        Xeon). On torch on a CPU it also times each shape on one thread; from then on, batches up
        to the largest shape where one thread was faster run on one thread
        (:attr:`torch_one_thread_tokens`). Call it on the thread that runs the batches (it runs the
        model; a thread's torch thread count is its own)."""
        if self.forward_cost_tokens is None:
            run, on_graph = self._probe_runs()
            runtime, graph, label = "torch", self._onnx, "torch"
            if graph is not None and self.onnx_max_tokens >= EVERY_BATCH:
                runtime, run, label = "onnx", on_graph(graph), graph.label
            shapes = tuple((rows, min(tokens, self.max_seq_length)) for rows, tokens in COST_SHAPES)
            one_thread = None
            if runtime == "torch" and self.device.type == "cpu" and torch.get_num_threads() > 1:
                one_thread = self._one_torch_thread
            try:
                measured = measure_forward_cost(run, runtime=runtime, shapes=shapes, one_thread=one_thread)
            except Exception as exc:  # the batcher then prices a pass at its default
                log.warning("could not measure the forward pass's cost (%s: %s)", type(exc).__name__, exc)
                return None
            self.forward_cost_tokens = measured.forward_cost_tokens(runtime)
            self.torch_one_thread_tokens = measured.one_thread_tokens
            log.info(
                "one more %s forward pass costs ~%s padded tokens (measured in %.2fs)%s",
                label,
                "?" if self.forward_cost_tokens is None else round(self.forward_cost_tokens),
                measured.seconds,
                "" if one_thread is None else f"; torch runs {self.torch_threads_note}",
            )
        return self.forward_cost_tokens

    @property
    def torch_threads_note(self) -> str:
        """Which torch batches run on one thread (:meth:`measure_forward_cost`), in words."""
        if self.torch_one_thread_tokens <= 0:
            return f"every batch on {torch.get_num_threads()} threads"
        return (
            f"batches of up to {self.torch_one_thread_tokens} padded tokens on one thread (measured "
            f"faster there than {torch.get_num_threads()}), larger ones on {torch.get_num_threads()}"
        )

    @contextlib.contextmanager
    def _one_torch_thread(self) -> Iterator[None]:
        """torch on one thread inside, on all it had before after (set by the calling thread; with
        OpenMP, the thread count is the calling thread's own)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def use_graph(self, session: GraphSession | OpenVINOSession) -> None:
        """Start routing batches to ``session``; with ``auto``, first time the runtimes (torch,
        ``session``, and OpenVINO in f32 when :meth:`open_graph` compiled it) and keep each graph
        runtime for the batch sizes where it was faster (dropping the ones that never were).
        Call it on the thread that runs the batches (it runs the model)."""
        self.pending_graph = None
        self._onnx = session
        self.graph_path = session.path
        self._openvino, self.max_ort_tokens = None, EVERY_BATCH
        openvino, self._pending_openvino = self._pending_openvino, None
        kept_alone, self._kept_without_openvino = self._kept_without_openvino, None
        on_openvino = "" if isinstance(session, GraphSession) else f" ({session.label}, {session.precision})"
        if self.backend in ("onnx", "openvino"):
            self.onnx_max_tokens = EVERY_BATCH
            self.backend_note = f"{self.backend} for every batch{on_openvino}"
            return
        try:
            if kept_alone is not None:
                measured, how = (
                    kept_alone,
                    "kept from an earlier start; OpenVINO, which it gives no batch, not compiled",
                )
            else:
                measured, how = self._measure_backends(session, openvino)
        except Exception as exc:
            if openvino is None:
                self._onnx = self.graph_path = None
                self.backend_note = (
                    f"the backend measurement failed ({type(exc).__name__}: {exc}); torch only"
                )
                log.warning("%s", self.backend_note)
                return
            # the optional third runtime failed: measure the other two as if it were not installed
            log.warning(
                "OpenVINO failed while auto measured it (%s: %s); measuring without it",
                type(exc).__name__,
                exc,
            )
            self.use_graph(session)  # its session is dropped with this frame
            return
        self.crossover = measured
        self.onnx_max_tokens = measured.max_onnx_tokens
        self.backend_note = measured.describe() + (on_openvino if self.onnx_max_tokens > 0 else "")
        split = measured.max_ort_tokens if openvino is not None else None
        if self.onnx_max_tokens <= 0:
            self._onnx = self.graph_path = None  # never faster here: free its copy of the weights
        elif split is not None and split <= 0:  # OpenVINO takes every graph batch: free ONNX Runtime
            self._onnx = openvino
        elif split is not None:
            self._openvino, self.max_ort_tokens = openvino, split
        # what one more pass costs on the runtimes the plan gives the small batches
        self.forward_cost_tokens = measured.forward_cost_tokens(
            "graph" if self._onnx is not None else "torch"
        )
        log.info("backend auto: %s (%s, %.2fs)", self.backend_note, how, measured.seconds)

    def _kept_plan_path(self, session: GraphSession | OpenVINOSession, openvino: str | None) -> Path:
        """Where auto's measurement of torch against ``session`` (and, three-way, OpenVINO in f32 of
        version ``openvino``) is kept: each set of runtimes and versions is a measurement of its own."""
        versions = f"torch-{torch.__version__} {self.graph_key.runtime}"
        if not isinstance(session, GraphSession):  # OpenVINO against torch's bf16
            versions += f" {session.runtime}"
        if openvino is not None:
            versions += f" {openvino}"
        return crossover_path(
            cache_dir() / "crossover", self.graph_key.digest, torch.get_num_threads(), versions
        )

    def _measure_backends(
        self, session: GraphSession | OpenVINOSession, openvino: OpenVINOSession | None
    ) -> tuple[Crossover, str]:
        """auto's measurement for these runtimes: kept from an earlier start under their key, else
        measured now (and kept when the machine was quiet); with a word on which it was."""
        run_torch, on_graph = self._probe_runs()
        kept = self._kept_plan_path(session, openvino.runtime if openvino is not None else None)
        measured = load_crossover(kept)
        if measured is not None:
            return measured, "kept from an earlier start"
        run_openvino = on_graph(openvino) if openvino is not None else None
        measured = measure_crossover(run_torch, on_graph(session), run_openvino=run_openvino)
        if measured.keep:
            save_crossover(kept, measured)
            return measured, "measured"
        return measured, (
            f"measured while other processes used {measured.others_cpu_share:.0%} of the CPUs, "
            "so not kept: the next start measures again"
        )

    def _check_dimensions(self, dimensions: int | None) -> int | None:
        if dimensions is None:
            return None
        full = self.model.dimension
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= full:
            raise InputError(
                f"dimensions must be an integer between 1 and {full} (the model's dimension), got {dimensions!r}",
                field="dimensions",
            )
        return dimensions

    # ------------------------------------------------------------ description
    @property
    def dimension(self) -> int:
        """Length of the vectors this embedder returns (after any Matryoshka truncation)."""
        return self.dimensions or self.model.dimension

    @property
    def max_seq_length(self) -> int:
        return self.model.max_seq_length

    @property
    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = content_hash(self.model.path)
        return self._hash

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.model.name,
            path=str(self.model.path),
            model_type=self.model.model_type,
            dimension=self.model.dimension,
            max_seq_length=self.model.max_seq_length,
            pooling=self.model.pooling,
            normalize=self.model.normalize,
            num_parameters=self.model.num_parameters,
            content_hash=self.content_hash,
            prompts=dict(self.model.prompts),
        )

    def describe(self) -> dict[str, Any]:
        """The effective engine configuration, as printed on start-up."""
        return {
            "model": self.model.name,
            "model_path": str(self.model.path),
            "device": ",".join(str(d) for d in self.devices),
            "precision": self.precision,
            "max_batch_tokens": self.max_batch_tokens,
            "max_batch_size": self.max_batch_size,
            "normalize": self.normalize,
            "dimensions": self.dimension,
            "max_seq_length": self.max_seq_length,
            "pooling": self.model.pooling,
            "truncate": self.truncate,
            "threads": torch.get_num_threads(),
            "cpu_fusion": self.fused_modules,
            "unpadded": self.unpadded,
            "backend": self.backend,
            "backend_plan": self.backend_note,
            "merged_batches": self.packed_note,
            "outputs": list(self.outputs),
        }

    # -------------------------------------------------------------- stage: pre
    def _prompt(self, prompt_name: str | None) -> str:
        name = (
            prompt_name if prompt_name is not None else (self.prompt_name or self.model.default_prompt_name)
        )
        if name is None:
            return ""
        if name not in self.model.prompts:
            raise InputError(
                f"prompt_name {name!r} is not defined by the model; it defines: "
                f"{sorted(self.model.prompts) or 'no prompts'}",
                field="prompt_name",
            )
        return self.model.prompts[name]

    def tokenize(
        self,
        texts: Sequence[Any],
        *,
        truncate: bool | None = None,
        prompt_name: str | None = None,
        field: str = "inputs",
        offset: int = 0,
    ) -> Tokenized:
        """Validate and tokenise ``texts`` (no padding). Raises :class:`InputError` naming the index."""
        checked = validate_texts(texts, field=field, offset=offset)
        prefix = self._prompt(prompt_name)
        if prefix:
            checked = [prefix + t for t in checked]
        return self.tokenizer(
            checked, truncate=self.truncate if truncate is None else truncate, field=field, offset=offset
        )

    def _to_tensors(
        self, ids: list[np.ndarray], device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = device or self.device
        input_ids, mask = pad_batch(ids, self.tokenizer.pad_id)
        to_device = self.runner.to_device
        return to_device(torch.from_numpy(input_ids), device), to_device(torch.from_numpy(mask), device)

    # ------------------------------------------------------------- stage: core
    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, replica: int = 0, outputs: tuple = DENSE_ONLY
    ) -> Any:
        """The pooled vectors of one padded batch; with more ``outputs`` than dense, a dict that
        also holds the sparse heads' token weights and the ColBERT head's vectors (padding zeroed)."""
        _, transformer, heads = self.runner.replicas[replica]
        with self.runner.context(replica):
            out = transformer(input_ids=input_ids, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            pooled = pool(self.model.pooling, hidden, mask)
            for layer in heads[: len(self.model.dense)]:
                pooled = layer(pooled.float())
            if outputs == DENSE_ONLY:
                return pooled.float()
            return self._token_outputs(pooled.float(), hidden.float(), mask, outputs, heads)

    def _token_outputs(
        self, pooled: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, outputs: tuple, heads: list
    ) -> dict[str, torch.Tensor]:
        """BGE-M3's heads over the last hidden states: per-token sparse weights and ColBERT vectors."""
        found = {"dense": pooled}  # the heads' answers in float32 (autocast runs them in bf16/fp16)
        if "sparse" in outputs:
            found["sparse"] = torch.relu(heads[self._head_slot["sparse"]](hidden)).squeeze(-1).float()
        if "colbert" in outputs:
            vecs = heads[self._head_slot["colbert"]](hidden[:, 1:]).float()
            found["colbert"] = vecs * mask[:, 1:, None].float()
        return found

    def _token_level(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self.runner.context():
            out = self._transformer(input_ids=input_ids, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return hidden.float()

    # ------------------------------------------------------------- stage: post
    @staticmethod
    def _post(vecs: torch.Tensor | np.ndarray, normalize: bool, dimensions: int | None) -> np.ndarray:
        """Float32 rows on the host, cut to ``dimensions`` and L2-normalised as
        ``torch.nn.functional.normalize`` does (norm clamped at 1e-12), in NumPy: four torch calls
        cost ~0.07 ms of a ~2.5 ms one-text query. ONNX Runtime's rows come as NumPy already."""
        rows = vecs if isinstance(vecs, np.ndarray) else vecs.detach().cpu().numpy()
        if dimensions is not None and dimensions < rows.shape[1]:
            rows = rows[:, :dimensions]
        if normalize:
            norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float32))[:, None]
            rows = rows / np.maximum(norms, np.float32(1e-12))
        return rows

    def _run_model(
        self, tensors: tuple[torch.Tensor, ...], replica: int, outputs: tuple = DENSE_ONLY
    ) -> tuple[Any, dict]:
        """One padded batch on the graph (ONNX Runtime, or OpenVINO in bf16; the first replica,
        when the backend plan gives it this many padded tokens; for BGE-M3's other outputs, a graph
        that also gives the token states) or on torch; what :meth:`_forward` returns and the counters the runner adds to stats."""
        padded = int(tensors[0].numel())
        graph = self._graph_for(padded)
        on_graph = (
            graph is not None
            and replica == 0
            and padded <= self.onnx_max_tokens
            and (outputs == DENSE_ONLY or graph.token_states)
        )
        if not on_graph:
            # one thread where measure_forward_cost found it faster (measured on CPUs only)
            alone = 0 < padded <= self.torch_one_thread_tokens
            with self._one_torch_thread() if alone else contextlib.nullcontext():
                found = self._forward(*tensors, replica=replica, outputs=outputs)
        elif outputs == DENSE_ONLY:
            found = torch.from_numpy(graph.run(tensors[0].numpy(), tensors[1].numpy()))
        else:
            pooled, hidden = graph.run_tokens(tensors[0].numpy(), tensors[1].numpy())
            with torch.inference_mode():
                heads = self.runner.replicas[0].heads
                found = self._token_outputs(
                    torch.from_numpy(pooled), torch.from_numpy(hidden), tensors[1], outputs, heads
                )
        return found, {"onnx_batches": int(on_graph), "padded_tokens": padded}

    def _workload(self, tok: Tokenized, outputs: tuple = DENSE_ONLY) -> Workload:
        """The runner's view of ``tok``: padded batches, this engine's budget, errors naming the input."""

        def shrink(idx: np.ndarray) -> str:
            longest = int(tok.lengths[idx].max())
            self.max_batch_tokens = max(longest, min(self.max_batch_tokens, len(idx) // 2 * longest))
            return f"out of memory on a batch of {len(idx)}; splitting, budget now {self.max_batch_tokens}"

        def too_big(i: int, device: torch.device) -> OutOfMemoryError:
            return OutOfMemoryError(
                f"input {i} ({int(tok.lengths[i])} tokens) does not fit in memory on {device} even "
                f"alone; lower max_seq_length or use a device with more memory",
                index=i,
            )

        return Workload(
            prepare=lambda idx, replica: self._to_tensors([tok.ids[i] for i in idx], replica.device),
            forward=lambda tensors, replica: self._run_model(tensors, replica, outputs),
            shrink=shrink,
            too_big=too_big,
            stats=self.stats,
            cost=lambda idx: len(idx) * int(tok.lengths[idx].max()),
        )

    def embed_tokenized(
        self,
        tok: Tokenized,
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
    ) -> np.ndarray:
        """Embed already tokenised inputs; rows come back in ``tok``'s order (float32)."""
        graph = self._graph_for(tok.num_tokens)
        if graph is not None and self.runs_alone_on_graph(tok):
            result = self._one_on_graph(graph, tok.ids[0], normalize, dimensions)
        else:
            result = self._run(self._workload(tok), self._plan(tok), len(tok), normalize, dimensions)
        self.stats.add(texts=len(tok), tokens=tok.num_tokens, truncated=tok.num_truncated)
        return result

    @property
    def unpadded(self) -> bool:
        """Whether torch runs this model's dense layers on real tokens only (:mod:`embedkit.engine.unpad`)."""
        return isinstance(self._transformer, UnpaddedEncoder)

    def runs_alone_on_graph(self, tok: Tokenized) -> bool:
        """Whether :meth:`embed_tokenized` runs ``tok`` as one text straight on the graph."""
        return len(tok) == 1 and self._onnx is not None and tok.num_tokens <= self.onnx_max_tokens

    def _one_on_graph(
        self,
        graph: GraphSession | OpenVINOSession,
        ids: np.ndarray,
        normalize: bool | None,
        dimensions: int | None,
    ) -> np.ndarray:
        """One text on the graph (ONNX Runtime or OpenVINO), straight: the same feeds, graph and post stage as
        :meth:`_run` (so the same bits) without the runner's batching and tensor round trips, which
        cost ~0.2 ms of a ~2.4 ms one-text query (a serving hot path)."""
        norm, dims = self._post_options(normalize, dimensions)
        input_ids = ids.astype(np.int64)[None, :]
        t0 = time.perf_counter()
        vecs = graph.run(input_ids, np.ones_like(input_ids))
        self.stats.add(
            model_seconds=time.perf_counter() - t0, batches=1, onnx_batches=1, padded_tokens=len(ids)
        )
        return np.ascontiguousarray(self._post(vecs, norm, dims))

    def _run(
        self, work: Workload, batches: list, n: int, normalize: bool | None, dims: int | None
    ) -> np.ndarray:
        """``n`` rows of float32 vectors: ``batches`` through the runner, then the post stage."""
        norm, dims = self._post_options(normalize, dims)
        out = np.empty((n, dims or self.model.dimension), dtype=np.float32)

        def emit(rows: Batch, vecs: torch.Tensor) -> None:
            out[rows] = self._post(vecs, norm, dims)

        self.runner.run_all(work, batches, emit)
        return out

    def _post_options(self, normalize: bool | None, dimensions: int | None) -> tuple[bool, int | None]:
        """A call's normalisation and Matryoshka width: its own, else this engine's."""
        dims = self._check_dimensions(dimensions) if dimensions is not None else self.dimensions
        return (self.normalize if normalize is None else bool(normalize)), dims

    def _plan(self, tok: Tokenized) -> list[np.ndarray]:
        return plan_batches(
            tok.lengths,
            self.max_batch_tokens,
            self.max_batch_size,
            max_attention_cells=self.max_attention_cells,
        )

    def embed_tokenized_multi(
        self,
        tok: Tokenized,
        outputs: tuple[str, ...],
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
    ) -> MultiVectors:
        """Embed already tokenised inputs into ``outputs`` (any of dense, sparse, colbert; see
        :mod:`embedkit.engine.multi`), all from the same forward pass, rows in ``tok``'s order."""
        check_outputs(outputs, self.outputs, self.model.name)
        if outputs == DENSE_ONLY:  # the dense path as it is (ONNX Runtime where it was faster)
            vecs = self.embed_tokenized(tok, normalize=normalize, dimensions=dimensions)
            return MultiVectors(vecs, None, None, tok.lengths.copy(), tok.truncated.copy())
        norm, dims = self._post_options(normalize, dimensions)
        n = len(tok)
        dense = np.empty((n, dims or self.model.dimension), np.float32) if "dense" in outputs else None
        sparse: list = [None] * n
        colbert: list = [None] * n

        def emit(rows: Batch, found: dict[str, torch.Tensor]) -> None:
            if dense is not None:
                dense[rows] = self._post(found["dense"], norm, dims)
            weights = found["sparse"].cpu().numpy() if "sparse" in found else None
            vecs = found.get("colbert")
            if vecs is not None and norm:
                vecs = torch.nn.functional.normalize(vecs, dim=-1)
            vecs = vecs.cpu().numpy() if vecs is not None else None
            for r, i in enumerate(rows):
                length = int(tok.lengths[i])
                if weights is not None:
                    sparse[i] = sparse_from_token_weights(weights[r, :length], tok.ids[i], self._special_ids)
                if vecs is not None:
                    colbert[i] = vecs[r, : length - 1].copy()

        self.runner.run_all(self._workload(tok, outputs), self._plan(tok), emit)
        self.stats.add(texts=n, tokens=tok.num_tokens, truncated=tok.num_truncated)
        return MultiVectors(
            dense=dense,
            sparse=sparse if "sparse" in outputs else None,
            colbert=colbert if "colbert" in outputs else None,
            token_counts=tok.lengths.copy(),
            truncated=tok.truncated.copy(),
        )

    # -------------------------------------------------------------- public API
    def embed(
        self,
        texts: Sequence[str],
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool | None = None,
        prompt_name: str | None = None,
    ) -> EncodeResult:
        """Like :meth:`encode`, also returning token counts and which inputs were truncated."""
        tok = self.tokenize(texts, truncate=truncate, prompt_name=prompt_name)
        vecs = self.embed_tokenized(tok, normalize=normalize, dimensions=dimensions)
        return EncodeResult(vecs, tok.lengths.copy(), tok.truncated.copy())

    def embed_multi(
        self,
        texts: Sequence[str],
        outputs: tuple[str, ...] = ("dense", "sparse", "colbert"),
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool | None = None,
        prompt_name: str | None = None,
    ) -> MultiVectors:
        """Several outputs of ``texts`` (dense, sparse, colbert) from one forward pass per batch."""
        check_outputs(outputs, self.outputs, self.model.name)
        tok = self.tokenize(texts, truncate=truncate, prompt_name=prompt_name)
        return self.embed_tokenized_multi(tok, outputs, normalize=normalize, dimensions=dimensions)

    def encode(
        self,
        texts: Sequence[str] | str,
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool | None = None,
        prompt_name: str | None = None,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
    ) -> Any:
        """Embed ``texts`` into a float32 array of shape ``(len(texts), dimension)``, input order kept.
        A single string gives a 1-D vector.

        With ``return_sparse`` or ``return_colbert_vecs`` (BGE-M3-style models), the result is
        FlagEmbedding's ``BGEM3FlagModel.encode`` dict instead: ``dense_vecs`` (or ``None``),
        ``lexical_weights`` (``{token_id_str: weight}`` per text) and ``colbert_vecs`` (one
        ``(tokens - 1, dim)`` array per text), all from the same forward pass.
        """
        opts = dict(normalize=normalize, dimensions=dimensions, truncate=truncate, prompt_name=prompt_name)
        wanted = tuple(
            name
            for name, asked in (
                ("dense", return_dense),
                ("sparse", return_sparse),
                ("colbert", return_colbert_vecs),
            )
            if asked
        )
        if not wanted:
            raise InputError(
                "ask for at least one output (return_dense, return_sparse or return_colbert_vecs)"
            )
        if wanted == DENSE_ONLY:
            if isinstance(texts, str):
                return self.encode([texts], **opts)[0]
            return self.embed(texts, **opts).embeddings
        flag = self.embed_multi([texts] if isinstance(texts, str) else texts, wanted, **opts).to_flag()
        if isinstance(texts, str):  # FlagEmbedding gives one text's outputs unwrapped
            return {k: (v[0] if v is not None else None) for k, v in flag.items()}
        return flag

    def convert_id_to_token(self, lexical_weights: dict | list[dict]) -> dict | list[dict]:
        """Lexical weights keyed by token text instead of token id (FlagEmbedding's helper of the
        same name), for reading which words a text's sparse vector weighs."""
        decode = self.model.tokenizer.decode
        items = [lexical_weights] if isinstance(lexical_weights, dict) else lexical_weights
        named = [{decode([int(i)]): w for i, w in item.items()} for item in items]
        return named[0] if isinstance(lexical_weights, dict) else named

    def encode_iter(
        self,
        texts: Iterable[str],
        *,
        chunk_size: int = 4096,
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool | None = None,
        prompt_name: str | None = None,
    ) -> Iterator[np.ndarray]:
        """Stream ``texts`` (any iterable, consumed lazily) and yield one ``(k, dim)`` array per chunk
        of up to ``chunk_size`` inputs, in input order. Memory stays bounded by the chunk size; the
        next chunk is tokenised while the model runs the current one."""
        it = iter(texts)

        def take(start: int) -> Tokenized | None:  # an error raised here re-raises from result()
            chunk = list(itertools.islice(it, chunk_size))
            if not chunk:
                return None
            return self.tokenize(chunk, truncate=truncate, prompt_name=prompt_name, offset=start)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedkit-tok") as tok_pool:
            fut, start = tok_pool.submit(take, 0), 0
            while (tok := fut.result()) is not None:
                start += len(tok)
                fut = tok_pool.submit(take, start)
                yield self.embed_tokenized(tok, normalize=normalize, dimensions=dimensions)

    def token_embeddings(self, texts: Sequence[str], *, truncate: bool | None = None) -> list[np.ndarray]:
        """Unpooled last hidden states, one ``(tokens, hidden)`` array per text (HF feature-extraction)."""
        tok = self.tokenize(texts, truncate=truncate)
        out: list[np.ndarray | None] = [None] * len(tok)
        for idx in self._plan(tok):
            hidden = self._token_level(*self._to_tensors([tok.ids[i] for i in idx])).cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = hidden[row, : int(tok.lengths[i])]
        return out  # type: ignore[return-value]

    def warmup(self) -> None:
        """Run one tiny batch so the first real request does not pay for lazy initialisation."""
        self.encode(["warm up the model"])

    def close(self) -> None:
        self.runner.close()

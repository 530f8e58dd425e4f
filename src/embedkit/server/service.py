"""The server's state: settings, the model (loaded in the background), the batcher, metrics, hooks.

Loading happens on a thread after the socket is bound, so ``/ping`` answers 503 while the model
loads and warms up, then 200. If loading fails, ``on_fatal`` is called (the command then exits
with the error's exit code), except when the user's ``inference.py`` is what failed (its import or
its ``model_fn`` raised): then the server stays up answering 503 and the log says why, as
SageMaker's model servers do, so the endpoint's health check is what reports it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from embedkit.engine import Embedder, Tokenized, build_embedder
from embedkit.engine.multi import MultiVectors, check_outputs
from embedkit.errors import ConfigError, InputError, NotReadyError
from embedkit.models.resolve import model_directory
from embedkit.server.batcher import Batcher, adopt_packed
from embedkit.server.contracts import EmbedRequest, Limits
from embedkit.server.handlers import CustomHandler, HandlerLoadError, load_handler
from embedkit.server.metrics import ServerMetrics
from embedkit.server.settings import ServerSettings
from embedkit.settings import EngineSettings

log = logging.getLogger("embedkit.server")

# Requests with more characters than this are tokenised on a helper thread, not the event loop.
INLINE_TOKENIZE_CHARS = 16384


class Service:
    """Everything the routes share. ``state`` is ``loading``, ``ready``, ``failed`` or ``stopped``."""

    def __init__(
        self,
        engine: EngineSettings,
        server: ServerSettings,
        *,
        model_dir: Path | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine_settings = engine
        self.settings = server
        self.model_dir = model_dir
        self.on_fatal = on_fatal
        self.metrics = ServerMetrics()
        self.state = "loading"
        self.embedder: Embedder | None = None
        self.model: Any = None
        self.handler: CustomHandler | None = None
        self.batcher: Batcher | None = None
        self.limits: Limits | None = None
        self.load_error: BaseException | None = None
        self.load_seconds = 0.0
        self._thread: threading.Thread | None = None
        # set first thing in stop(): the loading thread's work after ready checks it
        self._stopping = threading.Event()

    # ---------------------------------------------------------------- lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._thread = threading.Thread(target=self._load, args=(loop,), name="embedkit-load", daemon=True)
        self._thread.start()

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        t0 = time.perf_counter()
        try:
            if self.settings.threads:
                torch.set_num_threads(self.settings.threads)
            s = self.settings
            if self.model_dir is None:  # --model DIR or model.tar.gz: code/ lives in it, as in /opt/ml/model
                self.model_dir = model_directory(self.engine_settings.model)
                if self.model_dir is not None:
                    self.engine_settings.model = str(self.model_dir)  # unpacked once, not again
            self.handler = load_handler(s.program, s.submit_directory, self.model_dir)
            self.model = self._build_model()
            self.embedder = self.model if isinstance(self.model, Embedder) else None
            if self.embedder is not None:
                self.embedder.warmup()
                dim, outputs = self.embedder.dimension, tuple(self.embedder.outputs)
            else:
                dim, outputs = 0, ("dense",)
            self.limits = Limits(
                dimension=dim, max_client_batch_size=s.max_client_batch_size, outputs=outputs
            )
            if self._stopping.is_set():  # stopped while loading: start no worker, never turn ready
                return
            self.batcher = Batcher(
                self.embedder,  # type: ignore[arg-type]
                max_wait_s=s.batch_wait_ms / 1000.0,
                max_queue_tokens=self._queue_tokens(),
                on_batch=self.metrics.on_batch,
            )
            self.batcher.start(loop)
            self.load_seconds = time.perf_counter() - t0
            self.state = "ready"
            self.metrics.ready.set(1)
            log.info("model ready in %.1fs: %s", self.load_seconds, self.describe())
            if self.embedder is not None and self.embedder.pending_graph is not None:
                self._attach_graph(loop)
            elif self.embedder is not None and self.embedder.forward_cost_tokens is None:
                self._on_worker(loop, self.embedder.measure_forward_cost)
            if self.embedder is not None and getattr(self.embedder, "packed_path", None) is not None:
                self._attach_packed(loop)
        except BaseException as exc:
            self.load_error = exc
            self.state = "failed"
            if isinstance(exc, HandlerLoadError):
                log.error(
                    "the custom handler failed to load, so /ping answers 503 until the server is restarted "
                    "with a working handler: %s",
                    exc,
                    exc_info=exc.__cause__ or exc,
                )
                return
            log.error("could not load the model: %s", exc, exc_info=not isinstance(exc, ConfigError))
            if self.on_fatal is not None:
                self.on_fatal(exc)

    def _attach_graph(self, loop: asyncio.AbstractEventLoop) -> None:
        """auto's ONNX graph, after /ping already answers 200 on torch: the session opens on this
        (loading) thread, then the start-up measurement and the switch run as one job on the
        inference worker, between batches, so the two runtimes never compute at once."""
        emb = self.embedder
        assert emb is not None
        session = emb.open_graph()
        if session is None:  # torch for every batch: price its forward pass for the batcher
            self._on_worker(loop, emb.measure_forward_cost)
            return
        self._on_worker(loop, emb.use_graph, session)

    def _attach_packed(self, loop: asyncio.AbstractEventLoop) -> None:
        """The packed graph for merged batches of mixed lengths (engine/packed.py), once the jobs
        queued before it (the graph's switch and measurements) are done, so that compiling it never
        disturbs them: compiled on this (loading) thread, then timed against length groups on the
        inference worker, which keeps it where it is faster (:func:`adopt_packed`)."""
        emb = self.embedder
        assert emb is not None
        done = threading.Event()
        self._on_worker(loop, done.set)
        while not done.wait(0.5):
            if self._stopping.is_set():  # the worker may never get to it
                return
        if self._stopping.is_set():
            return
        session = emb.open_packed()
        if session is not None:
            self._on_worker(loop, adopt_packed, emb, session)

    def _on_worker(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` as one job on the inference worker, between batches (from any thread)."""
        batcher = self.batcher
        assert batcher is not None

        def queue() -> None:
            try:
                batcher.call(fn, *args)
            except NotReadyError:  # shutting down: nothing left to speed up
                pass

        try:
            loop.call_soon_threadsafe(queue)
        except RuntimeError:  # the loop is closed
            pass

    def _build_model(self) -> Any:
        h = self.handler
        if h is not None and h.model_fn is not None:
            try:
                model = h.model_fn(str(h.model_dir))
            except Exception as exc:
                raise HandlerLoadError(f"{h.path}: model_fn raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(model, Embedder) and h.predict_fn is None and h.transform_fn is None:
                raise ConfigError(
                    f"{h.path}: model_fn returned a {type(model).__name__}, which embedkit's default "
                    "predict_fn cannot use; define predict_fn (or transform_fn) or return an embedkit.Embedder"
                )
            return model
        return build_embedder(self.engine_settings, defer_graph=True, packed=True)

    def _queue_tokens(self) -> int:
        if self.settings.max_queue_tokens:
            return self.settings.max_queue_tokens
        longest = self.embedder.max_seq_length if self.embedder is not None else 512
        return max(262144, self.settings.max_client_batch_size * longest)

    def stop(self) -> None:
        self._stopping.set()
        after_ready = self.state == "ready"
        if self.batcher is not None:
            self.batcher.stop(timeout=self.settings.graceful_timeout)
        self.state = "stopped"
        self.metrics.ready.set(0)
        # A loading thread still inside native code after ready (OpenVINO compiling a graph) when
        # the interpreter exits aborts the process ("terminate called without an active exception").
        # Before ready it may be loading for minutes, and a stop does not wait for that.
        thread = self._thread
        if after_ready and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.settings.graceful_timeout)

    # ----------------------------------------------------------------- health
    @property
    def healthy(self) -> bool:
        return self.state == "ready" and self.batcher is not None and self.batcher.alive

    def require_ready(self) -> Batcher:
        if self.healthy:
            return self.batcher  # type: ignore[return-value]
        if self.state == "loading":
            raise NotReadyError("the model is still loading; retry when GET /ping answers 200")
        if self.state == "failed":
            reason = f" ({self.load_error})" if isinstance(self.load_error, HandlerLoadError) else ""
            raise NotReadyError(f"the model failed to load{reason}; see the server log")
        if self.state == "stopped":
            raise NotReadyError("the server is shutting down")
        self.metrics.ready.set(0)
        raise NotReadyError("the inference worker has stopped; the server must be restarted")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "server": self.settings.to_dict()}
        if self.embedder is not None:
            out["engine"] = self.embedder.describe()
        if self.handler is not None:
            out["handler"] = {"path": str(self.handler.path), "hooks": self.handler.defined}
        if self.batcher is not None:
            out["batching"] = {
                "max_batch_tokens": self.batcher.max_batch_tokens,
                "max_wait_ms": self.settings.batch_wait_ms,
                "max_queue_tokens": self.batcher.max_queue_tokens,
            }
        return out

    # ----------------------------------------------------------------- compute
    def _embedder(self) -> Embedder:
        if self.embedder is None:
            raise ConfigError("the custom model_fn did not return an embedkit.Embedder; this route needs one")
        return self.embedder

    async def tokenize(self, req: EmbedRequest) -> Tokenized:
        emb = self._embedder()

        def run() -> Tokenized:
            return emb.tokenize(
                req.texts, truncate=req.truncate, prompt_name=req.prompt_name, field=req.field
            )

        if sum(len(t) for t in req.texts if isinstance(t, str)) > INLINE_TOKENIZE_CHARS:
            tok = await asyncio.get_running_loop().run_in_executor(None, run)
        else:
            tok = run()
        if tok.truncated.any():
            self.metrics.truncated.inc(int(tok.truncated.sum()))
        self.metrics.inputs.inc(len(tok))
        return tok

    async def embed(self, req: EmbedRequest) -> tuple[Any, Tokenized]:
        """Vectors for ``req`` through the dynamic batcher, plus its tokenisation (for usage counts)."""
        batcher = self.require_ready()
        tok = await self.tokenize(req)
        vecs = await batcher.submit(tok, normalize=req.normalize, dimensions=req.dimensions)
        return vecs, tok

    def check_outputs(self, outputs: tuple[str, ...]) -> None:
        """400 naming the missing head file when the model lacks an output ``outputs`` asks for."""
        emb = self._embedder()
        try:
            check_outputs(outputs, emb.outputs, emb.model.name)
        except ConfigError as exc:
            raise InputError(exc.message, field="parameters") from None

    def output_dims(self) -> tuple[int, int]:
        """The widths of dense and ColBERT vectors (0 for a model without a ColBERT head)."""
        emb = self._embedder()
        head = getattr(emb.model, "heads", {}).get("colbert")
        return emb.dimension, int(head.out_features) if head is not None else 0

    async def embed_multi(
        self, req: EmbedRequest, before: Callable[[Tokenized], None] | None = None
    ) -> tuple[MultiVectors, Tokenized]:
        """BGE-M3's ``req.outputs`` through the dynamic batcher, all from one forward pass.
        ``before`` sees the tokenisation first and may refuse the request (413) before it queues."""
        batcher = self.require_ready()
        self.check_outputs(req.outputs)
        tok = await self.tokenize(req)
        if before is not None:
            before(tok)
        found = await batcher.submit(
            tok, normalize=req.normalize, dimensions=req.dimensions, outputs=req.outputs
        )
        return found, tok

    async def token_embeddings(self, req: EmbedRequest) -> list:
        """Unpooled token vectors (HF DLC exact mode), computed on the inference worker."""
        batcher = self.require_ready()
        emb = self._embedder()
        await self.tokenize(req)  # validates and counts before queueing
        return await batcher.call(lambda: emb.token_embeddings(req.texts, truncate=req.truncate))

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a user hook on the inference worker."""
        return await self.require_ready().call(fn, *args)

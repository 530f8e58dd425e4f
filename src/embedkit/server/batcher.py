"""Dynamic batching, TEI style: requests from many clients share one forward pass.

Requests are tokenised on arrival and queued with their token counts; ONE inference worker thread
runs the engine once per batch and hands each request its rows (docs/server.md, "How it batches").
A request that would overflow the token-bounded queue gets :class:`~embedkit.errors.OverloadedError`
(429). The worker touches the event loop only through one ``call_soon_threadsafe`` per batch.

Requests for BGE-M3's lexical weights or ColBERT vectors (``outputs`` beyond dense) share a forward
pass only with each other: merged, they run once for the union of their outputs and each gets its
own (:class:`~embedkit.engine.multi.MultiVectors`). Dense-only requests keep their own path
(length groups, the ONNX graph), untouched by them.

>>> import asyncio
>>> from embedkit import Embedder
>>> async def main(emb):
...     batcher = Batcher(emb, max_queue_tokens=10_000)
...     batcher.start(asyncio.get_running_loop())
...     vecs = await batcher.submit(emb.tokenize(["hello world"]))
...     batcher.stop()
...     return vecs.shape
>>> asyncio.run(main(Embedder("default")))  # doctest: +SKIP
(1, 384)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from embedkit.engine import Embedder, Tokenized
from embedkit.engine.multi import DENSE_ONLY, OUTPUTS, MultiVectors
from embedkit.errors import InputError, NotReadyError, OverloadedError, PayloadTooLargeError

log = logging.getLogger("embedkit.server")

_STOP = object()
# One extra forward pass in padded tokens' worth of compute, when the engine measured nothing.
FORWARD_COST_TOKENS = 96
# The longest lone text the event loop runs itself when the worker is idle (Batcher._run_inline):
# ~7 ms of ONNX Runtime (fp32) on the 2-core Xeon for the default model. Longer texts go to the worker, so
# the loop never stops answering /ping and other connections for longer than a short query takes.
INLINE_MAX_TOKENS = 64


class _Item:
    __slots__ = ("future", "key", "outputs", "tok", "tokens")

    def __init__(
        self,
        tok: Tokenized,
        key: tuple[bool | None, int | None],
        future: asyncio.Future,
        outputs: tuple[str, ...] = DENSE_ONLY,
    ) -> None:
        self.tok = tok
        self.key = key
        self.future = future
        self.outputs = outputs
        self.tokens = int(tok.lengths.sum())


class _Job:
    """A callable run on the worker thread between batches (custom hooks, token-level output)."""

    __slots__ = ("args", "fn", "future", "tokens")

    def __init__(self, fn: Callable[..., Any], args: tuple, future: asyncio.Future) -> None:
        self.fn = fn
        self.args = args
        self.future = future
        self.tokens = 0


class Batcher:
    """Queue + one inference worker thread over an :class:`~embedkit.Embedder`.

    Args:
        embedder: the engine; only this worker calls it once started.
        max_batch_tokens: tokens per formed batch (default: the engine's budget).
        max_wait_s: how long a batch below the budget waits for more requests, when the previous
            batch merged several, and only until as many are in (0: never wait).
        max_queue_tokens: tokens waiting (queued or running) before new requests get 429.
        on_batch: called with ``(texts, tokens)`` after each batch (metrics), on the worker, or
            on the event loop for a text run inline.
        inline_idle: run a lone text that the graph takes on the event loop when the worker is
            idle (:meth:`_run_inline`).
    """

    def __init__(
        self,
        embedder: Embedder | None,
        *,
        max_batch_tokens: int | None = None,
        max_wait_s: float = 0.002,
        max_queue_tokens: int = 262144,
        on_batch: Callable[[int, int], None] | None = None,
        inline_idle: bool = True,
    ) -> None:
        self.embedder = embedder
        default_budget = embedder.max_batch_tokens if embedder is not None else 16384
        self.max_batch_tokens = int(max_batch_tokens or default_budget)
        self.max_wait_s = float(max_wait_s)
        self.max_queue_tokens = int(max_queue_tokens)
        self.on_batch = on_batch
        self.queued_tokens = 0  # changed on the event loop thread only
        self.tokens_per_s = 0.0  # moving average, for Retry-After
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        # Requests in the previous batch: a batch that merged several waits (up to max_wait_s) for
        # as many, and no longer once they are in (_gather).
        self._expect = 0
        # Items and jobs queued or running, counted on the event loop thread (submit/call add,
        # _deliver takes away): 0 means the worker is idle, so a lone text may run inline.
        self._in_flight = 0
        self.inline_idle = inline_idle
        self._standing: int | None = None  # the loop's tasks that are not requests; see _only_request
        self.error: BaseException | None = None

    # ------------------------------------------------------------ loop side
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def _check_open(self) -> None:
        if self._closing:
            raise NotReadyError("the server is shutting down; send the request to another instance")
        if self.error is not None or (self._thread is not None and not self._thread.is_alive()):
            raise NotReadyError("the inference worker has stopped; the server must be restarted")

    def submit(
        self,
        tok: Tokenized,
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        outputs: tuple[str, ...] = DENSE_ONLY,
    ) -> asyncio.Future:
        """Queue tokenised inputs; the future resolves to their ``(n, dim)`` float32 rows, or, with
        ``outputs`` beyond dense (BGE-M3), to their :class:`MultiVectors` (only those outputs).

        Call on the event loop thread. Raises 429 (:class:`OverloadedError`) when the queue is full,
        413 when the request alone is bigger than the whole queue."""
        self._check_open()
        loop = self._loop or asyncio.get_running_loop()
        item = _Item(tok, (normalize, dimensions), loop.create_future(), tuple(outputs))
        if item.tokens > self.max_queue_tokens:
            raise PayloadTooLargeError(
                f"request holds {item.tokens} tokens, more than the server's whole queue "
                f"({self.max_queue_tokens} tokens, max_queue_tokens); split it into smaller requests"
            )
        if self.queued_tokens and self.queued_tokens + item.tokens > self.max_queue_tokens:
            rate = self.tokens_per_s or 1000.0
            raise OverloadedError(
                f"server busy: {self.queued_tokens} tokens already waiting; retry shortly",
                retry_after=self.queued_tokens / rate,
            )
        if self._in_flight == 0 and self._run_inline(item):
            return item.future
        self.queued_tokens += item.tokens
        self._in_flight += 1
        self._q.put(item)
        return item.future

    def _count_standing(self) -> None:
        """On the loop, once the worker starts: the tasks that are not requests (the server's own)."""
        self._standing = len(asyncio.all_tasks(self._loop))

    def _only_request(self) -> bool:
        """Whether no other request is on the event loop: no more tasks than the server's standing
        ones (counted at start, and lowered when fewer are seen) plus this request's. Requests that
        arrived during an inline forward pass already have their tasks when the next one runs (the
        server creates a task per request as it reads the socket), so they queue for the worker and
        batching resumes: without this check every request at concurrency 32 ran inline, one at a
        time (199 against 250 requests/s). The count is never raised by load, so a server started
        under load does not learn a crowded loop as its idle state."""
        if self._standing is None:
            return False
        tasks = len(asyncio.all_tasks(self._loop))
        self._standing = min(self._standing, tasks - 1)
        return tasks <= self._standing + 1

    def _run_inline(self, item: _Item) -> bool:
        """With nothing queued or running, a lone text that the graph takes runs here on the
        event loop, not on the worker: the hand-off and the wake-up back cost ~0.2 ms of a ~3.5 ms
        one-text query. Only the graph runtime (ONNX Runtime or OpenVINO, each with its own thread
        pool) runs on this thread, never torch (whose OpenMP team belongs to the worker). True when
        the item's future is resolved."""
        alone_on_graph = getattr(self.embedder, "runs_alone_on_graph", None)  # None: a custom model_fn
        if (
            not self.inline_idle
            or alone_on_graph is None
            or item.tokens > INLINE_MAX_TOKENS
            or item.outputs != DENSE_ONLY
            or not alone_on_graph(item.tok)  # one text, and the graph takes it
            or not self._only_request()
        ):
            return False
        emb = self.embedder
        assert emb is not None
        normalize, dimensions = item.key
        t0 = time.perf_counter()
        try:
            vecs = emb.embed_tokenized(item.tok, normalize=normalize, dimensions=dimensions)
        except Exception as exc:
            item.future.set_exception(exc)
            self._after_batch(0.0, 1, item.tokens)  # a refusal says nothing about the speed
        else:
            item.future.set_result(vecs)
            self._after_batch(time.perf_counter() - t0, 1, item.tokens)
        return True

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run ``fn(*args)`` on the inference worker, in order with the batches; returns a future."""
        self._check_open()
        loop = self._loop or asyncio.get_running_loop()
        job = _Job(fn, args, loop.create_future())
        self._in_flight += 1
        self._q.put(job)
        return job.future

    def _deliver(self, results: list[tuple[asyncio.Future, Any, bool]], tokens: int) -> None:
        self.queued_tokens -= tokens
        self._in_flight -= len(results)
        for fut, value, failed in results:
            if fut.done():
                continue
            if failed:
                fut.set_exception(value)
            else:
                fut.set_result(value)

    # ---------------------------------------------------------- lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="embedkit-infer", daemon=True)
        self._thread.start()
        loop.call_soon_threadsafe(self._count_standing)  # start may run on the loading thread

    def stop(self, timeout: float | None = 25.0) -> None:
        """Refuse new work, finish everything queued, then end the worker."""
        self._closing = True
        if self._thread is not None and self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)

    # --------------------------------------------------------- worker side
    def _run(self) -> None:
        carry: Any = None
        batch: list[_Item] = []  # requests taken from the queue and not yet answered
        try:
            while True:
                item = carry if carry is not None else self._q.get()
                carry = None
                if item is _STOP:
                    return
                if isinstance(item, _Job):
                    self._run_job(item)
                    continue
                batch, carry = self._gather(item)
                self._process(batch)
                batch = []
        except BaseException as exc:  # the worker is gone: /ping turns 503
            self.error = exc
            log.critical("inference worker died; /ping now answers 503", exc_info=exc)
            self._fail_pending(carry, batch)

    def _gather(self, first: _Item) -> tuple[list[_Item], Any]:
        batch, tokens = [first], first.tokens
        carry: Any = None
        deadline = 0.0
        while tokens < self.max_batch_tokens:
            try:
                nxt = self._q.get_nowait()
            except queue.Empty:
                if self.max_wait_s <= 0 or len(batch) >= self._expect:
                    break
                now = time.monotonic()
                if not deadline:
                    deadline = now + self.max_wait_s
                if now >= deadline:
                    break
                try:
                    nxt = self._q.get(timeout=deadline - now)
                except queue.Empty:
                    # The timed wait can end well past the deadline: the worker needs the GIL to
                    # return, and the event loop holds it while it reads a burst of requests. What
                    # the loop queued meanwhile belongs to this batch (without this look, a batch
                    # of 1 ran and the other 30 requests of the burst waited behind it).
                    try:
                        nxt = self._q.get_nowait()
                    except queue.Empty:
                        break
            if not isinstance(nxt, _Item) or tokens + nxt.tokens > self.max_batch_tokens:
                carry = nxt
                break
            batch.append(nxt)
            tokens += nxt.tokens
        if isinstance(carry, _Item):  # cut by the budget: more were waiting; wait for them too
            self._expect = len(batch) + 1
        else:  # the queue ran dry, or a job comes next: the batch's own count
            self._expect = len(batch) if len(batch) > 1 else 0
        return batch, carry

    def _process(self, batch: list[_Item]) -> None:
        """Run ``batch`` and answer every request in it. On a fatal error (``SystemExit`` and the
        like) it answers what it ran, leaves in ``batch`` only the requests it did not answer (for
        :meth:`_fail_pending`), and re-raises."""
        t0 = time.perf_counter()
        groups: dict[tuple, list[_Item]] = {}
        for it in batch:  # dense-only requests never share a forward pass with multi-output ones
            groups.setdefault((it.key, it.outputs == DENSE_ONLY), []).append(it)
        results: list[tuple[asyncio.Future, Any, bool]] = []
        answered: list[_Item] = []
        tokens = texts = 0
        fatal: BaseException | None = None
        for ((normalize, dimensions), dense_only), items in groups.items():
            tok = items[0].tok if len(items) == 1 else Tokenized.concat([it.tok for it in items])
            texts += len(tok)
            tokens += sum(it.tokens for it in items)
            answered += items  # below, each outcome answers the whole group
            try:
                if dense_only:
                    vecs = self._embed(tok, alone=len(items) == 1, normalize=normalize, dimensions=dimensions)
                else:  # one forward pass for the union of what the merged requests ask for
                    assert self.embedder is not None
                    wanted = tuple(o for o in OUTPUTS if any(o in it.outputs for it in items))
                    vecs = self.embedder.embed_tokenized_multi(
                        tok, wanted, normalize=normalize, dimensions=dimensions
                    )
            except Exception as exc:
                results.extend((it.future, exc, True) for it in items)
                continue
            except BaseException as exc:
                results.extend((it.future, RuntimeError("inference worker stopped"), True) for it in items)
                fatal = exc
                break
            start = 0
            for it in items:
                n = len(it.tok)
                part = vecs[start : start + n] if dense_only else _rows(vecs, start, n, it.outputs)
                results.append((it.future, part, False))
                start += n
        self._post(results, tokens)  # the tokens of the answered requests
        self._after_batch(time.perf_counter() - t0, texts, tokens)
        if fatal is not None:
            ran = {id(it) for it in answered}
            batch[:] = [it for it in batch if id(it) not in ran]
            raise fatal

    def _after_batch(self, elapsed: float, texts: int, tokens: int) -> None:
        if elapsed > 0:
            rate = tokens / elapsed
            self.tokens_per_s = rate if not self.tokens_per_s else 0.8 * self.tokens_per_s + 0.2 * rate
        if self.on_batch is not None:
            self.on_batch(texts, tokens)

    def _embed(
        self, tok: Tokenized, *, alone: bool, normalize: bool | None, dimensions: int | None
    ) -> np.ndarray:
        """One request alone as ``Embedder.encode`` would (same bits); merged requests split into
        :func:`length_groups` first."""
        emb = self.embedder
        assert emb is not None
        if alone or len(tok) == 1:
            return emb.embed_tokenized(tok, normalize=normalize, dimensions=dimensions)
        return embed_merged(emb, tok, self.max_batch_tokens, normalize=normalize, dimensions=dimensions)

    def _run_job(self, job: _Job) -> None:
        try:
            value, failed = job.fn(*job.args), False
        except Exception as exc:
            value, failed = exc, True
        except BaseException:  # SystemExit from a hook and the like: the worker ends, the caller hears
            self._post([(job.future, NotReadyError("the inference worker has stopped"), True)], 0)
            raise
        self._post([(job.future, value, failed)], 0)

    def _post(self, results: list[tuple[asyncio.Future, Any, bool]], tokens: int) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, results, tokens)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _fail_pending(self, carry: Any, batch: list[_Item] = ()) -> None:
        """Fail what the dead worker leaves: the requests of its batch it did not answer, the item it
        carried, and everything queued."""
        err = NotReadyError("the inference worker has stopped; the server must be restarted")
        pending: list[Any] = list(batch)
        pending += [carry] if isinstance(carry, (_Item, _Job)) else []
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, (_Item, _Job)):
                pending.append(item)
        if pending:
            self._post([(p.future, err, True) for p in pending], sum(p.tokens for p in pending))


def _rows(found: MultiVectors, start: int, n: int, outputs: tuple[str, ...]) -> MultiVectors:
    """Rows ``start:start + n`` of a merged batch's outputs, keeping only the ``outputs`` asked for."""
    end = start + n
    return MultiVectors(
        dense=found.dense[start:end] if "dense" in outputs and found.dense is not None else None,
        sparse=found.sparse[start:end] if "sparse" in outputs and found.sparse is not None else None,
        colbert=found.colbert[start:end] if "colbert" in outputs and found.colbert is not None else None,
        token_counts=found.token_counts[start:end],
        truncated=found.truncated[start:end],
    )


def embed_merged(
    embedder: Embedder,
    tok: Tokenized,
    max_tokens: int,
    *,
    normalize: bool | None = None,
    dimensions: int | None = None,
    packed: bool = True,
) -> np.ndarray:
    """Vectors for merged requests' texts ``tok`` (rows in ``tok``'s order), as the worker computes
    them: cut into :func:`length_groups` priced at the engine's measured forward cost; texts of
    one length group in one ``embed_tokenized`` call, of several in one pass of the packed graph
    where the server kept it (:func:`adopt_packed`), else one call per group. The bench replays
    the server's batches through it."""
    measured = getattr(embedder, "forward_cost_tokens", None)
    cost = round(measured) if measured else FORWARD_COST_TOKENS
    groups = length_groups(tok.lengths, max_tokens, cost)
    if len(groups) == 1:
        return embedder.embed_tokenized(tok, normalize=normalize, dimensions=dimensions)
    if packed and getattr(embedder, "packed", None) is not None and tok.num_tokens <= max_tokens:
        try:
            found = embedder.embed_packed(tok, normalize=normalize, dimensions=dimensions)
        except InputError:
            raise
        except Exception as exc:  # an optional speed-up: never fail a request for it
            embedder.packed = None
            embedder.packed_note = (
                f"length groups: the packed graph failed on a merged batch ({type(exc).__name__}: {exc})"
            )
            log.warning("%s; merged batches run in length groups from now on", embedder.packed_note)
            found = None
        if found is not None:  # None: its attention would not fit the engine's budget
            return found
    out: np.ndarray | None = None
    for idx in groups:
        part = embedder.embed_tokenized(tok.select(idx), normalize=normalize, dimensions=dimensions)
        if out is None:
            out = np.empty((len(tok), part.shape[1]), dtype=np.float32)
        out[idx] = part
    assert out is not None
    return out


def length_groups(
    lengths: np.ndarray, max_tokens: int, forward_cost: int = FORWARD_COST_TOKENS
) -> list[np.ndarray]:
    """Split texts into groups that minimise padded tokens plus ``forward_cost`` per group: runs of
    the length-sorted texts, each ``n`` texts of at most ``L`` tokens costing ``forward_cost + n * L``
    (at most ``max_tokens``). Returns index arrays into ``lengths``.

    >>> [g.tolist() for g in length_groups(np.array([12, 250, 10, 11, 240]), 16384, 96)]
    [[1, 4], [0, 3, 2]]
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    order = np.argsort(-lengths, kind="stable")
    s = np.maximum(lengths[order], 1).astype(np.int64)
    best = np.zeros(n + 1, dtype=np.int64)
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        i = np.arange(j)
        cost = best[:j] + forward_cost + (j - i) * s[:j]
        fits = (j - i) * s[:j] <= max_tokens
        fits[j - 1] = True  # a single text always forms a group
        cost = np.where(fits, cost, np.iinfo(np.int64).max)
        k = int(np.argmin(cost))
        best[j] = cost[k]
        cut[j] = k
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = int(cut[j])
    groups.reverse()
    return groups


# A merged batch of 32 one-text requests of a search workload: 30 queries of 6-40 tokens, two
# passages of 256 (what the benchmark corpus's batches look like). A batch with fewer, evenly
# spread lengths (8-200 tokens) priced the packed graph at 0.88-0.92x of length groups, where the
# server's real batches measured 0.86x; this one measures 0.86x, so the 5% margin holds.
MIXED_BATCH_LENGTHS = (6, 7, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15, 16, 16, 17, 18, 19,
                       20, 21, 22, 24, 26, 29, 33, 40, 256, 256)  # fmt: skip


def _mixed_batch(embedder: Embedder) -> Tokenized:
    """:data:`MIXED_BATCH_LENGTHS` as random token ids, lengths capped at the model's maximum."""
    lengths = np.minimum(np.array(MIXED_BATCH_LENGTHS), embedder.max_seq_length)
    vocab = int(getattr(getattr(embedder.model.transformer, "config", None), "vocab_size", 1000))
    rng = np.random.default_rng(0)
    ids = [rng.integers(min(vocab - 1, 100), vocab, size=int(n)).astype(np.int32) for n in lengths]
    none = np.zeros(len(ids), dtype=bool)
    return Tokenized(ids, lengths.astype(np.int64), lengths.astype(np.int64), none)


def adopt_packed(embedder: Embedder, session: Any, rounds: int = 3) -> bool:
    """Time a merged batch of mixed lengths (:func:`_mixed_batch`) in length groups and in one pass
    of the packed ``session`` (alternating, best of ``rounds`` each), and keep the packed graph for
    merged batches (``embedder.packed``) where it was faster by 5%. Runs the model: call it on the
    inference worker. Returns whether it kept it."""
    tok = _mixed_batch(embedder)
    max_tokens = max(embedder.max_batch_tokens, tok.num_tokens)

    def grouped() -> object:
        return embed_merged(embedder, tok, max_tokens, packed=False)

    def packed() -> object:
        found = embedder.embed_packed(tok, session=session)
        if found is None:
            raise RuntimeError("the mixed batch's attention exceeds the engine's memory bound")
        return found

    best = {grouped: float("inf"), packed: float("inf")}
    try:
        for fn in best:  # first passes compile kernels for their shapes: untimed
            fn()
        for _ in range(rounds):
            for fn in best:
                t0 = time.perf_counter()
                fn()
                best[fn] = min(best[fn], time.perf_counter() - t0)
    except Exception as exc:
        embedder.packed_note = f"length groups: the packed graph failed ({type(exc).__name__}: {exc})"
        log.warning("%s", embedder.packed_note)
        return False
    groups, one = best[grouped] * 1e3, best[packed] * 1e3
    keep = one <= 0.95 * groups
    how = f"{one:.1f} ms packed against {groups:.1f} ms in length groups for {len(tok)} mixed texts"
    if keep:
        embedder.packed = session
        embedder.packed_note = f"packed on {session.label} ({session.precision}): {how}"
    else:
        embedder.packed_note = f"length groups: {how}"
    log.info("merged batches of mixed lengths: %s", embedder.packed_note)
    return keep

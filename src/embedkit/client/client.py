"""``EmbeddingClient`` and ``AsyncEmbeddingClient``: the same code against a local server and SageMaker.

Only configuration differs between the two (see :class:`~embedkit.client.settings.ClientSettings`):

>>> import os
>>> os.environ["EMBEDKIT_ENDPOINT_URL"] = "http://localhost:8080"   # or EMBEDKIT_SAGEMAKER_ENDPOINT=name
>>> with EmbeddingClient() as client:                                 # doctest: +SKIP
...     vecs = client.embed(["a cat sits on the mat", "ein Hund im Park"])   # float32 (2, dim)
...     one = client.embed_one("a query")                                      # float32 (dim,)
...     weights = client.embed_sparse(["a query"])          # BGE-M3: [{"token_id": weight}]
...     m3 = client.embed_multi(["a doc"])   # {"dense_vecs", "lexical_weights", "colbert_vecs"}

Splitting, concurrency and retries: docs/client.md ("Splitting", "Retries and errors"); BGE-M3's
outputs: docs/client.md ("BGE-M3: lexical weights and ColBERT vectors").
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedkit.client.contracts import (
    OUTPUTS,
    Contract,
    make_contract,
    merge_flags,
    plan_requests,
    validate_texts,
)
from embedkit.client.retry import RetryPolicy, TransportFailure, WireResponse
from embedkit.client.settings import ClientSettings
from embedkit.client.transports import AsyncHttpTransport, HttpTransport, SageMakerTransport
from embedkit.errors import ConfigError, InputError

log = logging.getLogger(__name__)


@dataclass
class ClientStats:
    """Counters since the client was made: requests sent (attempts), retries, failed requests."""

    requests: int = 0
    retries: int = 0
    failures: int = 0


def _options(
    normalize: bool | None = None,
    dimensions: int | None = None,
    truncate: bool | None = None,
    prompt_name: str | None = None,
) -> dict[str, Any]:
    """The options given (None: not sent); by keyword from the async client, whose methods pass theirs on."""
    given = dict(normalize=normalize, dimensions=dimensions, truncate=truncate, prompt_name=prompt_name)
    return {k: v for k, v in given.items() if v is not None}


def _outputs(outputs: Sequence[str] | str) -> tuple[str, ...]:
    """``outputs`` in BGE-M3's order (dense, sparse, colbert); unknown or no names are an InputError."""
    names = [outputs] if isinstance(outputs, str) else list(outputs)
    unknown = sorted({str(n) for n in names} - set(OUTPUTS))
    if unknown or not names:
        raise InputError(
            f"outputs must name some of {', '.join(OUTPUTS)}; got {unknown or 'none'}", field="outputs"
        )
    return tuple(o for o in OUTPUTS if o in names)


def _dtype(dtype: str | None) -> str | None:
    if dtype not in (None, "float32", "float16"):
        raise InputError(f"dtype must be 'float32' or 'float16', got {dtype!r}", field="dtype")
    return dtype


class _Base:
    """What both clients share: settings, contract, transport, splitting, decoding, counters."""

    _http: Any  # the HTTP transport class: sync or async

    def __init__(self, settings: ClientSettings | None = None, /, **overrides: Any) -> None:
        if settings is None:
            # Naming one transport in code replaces the other one the environment may name.
            if overrides.get("endpoint_url"):
                overrides.setdefault("sagemaker_endpoint", "")
            elif overrides.get("sagemaker_endpoint"):
                overrides.setdefault("endpoint_url", "")
            settings = ClientSettings.from_env(**overrides)
            for name in ("endpoint_url", "sagemaker_endpoint"):
                if getattr(settings, name) == "":
                    setattr(settings, name, None)
        elif overrides:
            raise ConfigError("pass either a ClientSettings or keyword settings, not both")
        self.settings = settings.validate()
        self.contract: Contract = make_contract(
            settings.contract,
            search_term_batch=settings.search_term_batch,
            token_pooling=settings.token_pooling,
            openai_model=settings.openai_model,
        )
        self.policy = RetryPolicy(
            max_retries=settings.max_retries,
            deadline=settings.retry_deadline,
            backoff=settings.retry_backoff,
            backoff_max=settings.retry_backoff_max,
            request_timeout=settings.request_timeout,
        )
        self.stats = ClientStats()
        self._lock = threading.Lock()
        if self.settings.transport == "sagemaker":
            self._transport: Any = SageMakerTransport(self.settings)
        else:
            self._transport = self._http(self.settings, self.contract.path)

    @property
    def transport_name(self) -> str:
        """``http`` or ``sagemaker``: which transport the configuration chose."""
        return self.settings.transport

    @property
    def target(self) -> str:
        """Where requests go, for logs: the URL or the SageMaker endpoint."""
        url = getattr(self._transport, "url", None)
        return url or self.settings.target()

    def _plan(
        self, texts: Sequence[str], options: dict[str, Any], contract: Contract
    ) -> tuple[list[str], list[tuple[int, int]]]:
        texts = validate_texts(texts)
        ranges = plan_requests(
            texts,
            contract,
            options,
            max_batch=self.settings.max_batch,
            max_payload_bytes=self.settings.max_payload_bytes,
        )
        return texts, ranges

    def _count(self, *, retry: bool = False, failure: bool = False) -> None:
        with self._lock:
            self.stats.requests += 0 if failure else 1
            self.stats.retries += int(retry)
            self.stats.failures += int(failure)

    def _multi_plan(
        self, outputs: Sequence[str] | str, dtype: str | None, options: dict[str, Any]
    ) -> tuple[tuple[str, ...], list[Contract], dict[str, Any]]:
        """embed_multi's outputs in M3's order, the contracts (requests) they take, and the options."""
        wanted = _outputs(outputs)
        if _dtype(dtype):
            options["dtype"] = dtype
        return wanted, self.contract.multi(wanted), options

    @staticmethod
    def _join(parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


class _Call:
    """One request of ``texts[start:end]``, all but its I/O (the one thing the two clients do
    differently): the body, the route and ``Accept``, the attempts, and what each answer means.

    ``with call.attempt() as timeout:`` wraps one send and its :meth:`answer`; after it, either
    ``call.done`` (the decoded ``call.result``) or wait ``call.delay`` and try again."""

    def __init__(
        self, client: _Base, contract: Contract, texts: list[str], start: int, end: int, options: dict
    ) -> None:
        self.client, self.contract, self.options = client, contract, options
        self.count = end - start
        self.body = contract.encode(texts[start:end], options)
        self.send_args = {"route": contract.route, "accept": contract.accept}
        what = f"texts[{start}]" if end - start == 1 else f"texts[{start}:{end}]"
        self.attempts = client.policy.start(client.target, what)
        self.done, self.result, self.delay = False, None, 0.0

    @contextmanager
    def attempt(self) -> Iterator[float]:
        """One attempt; yields its timeout. A TransportFailure in it sets the wait before the next
        one (or raises the typed error when none is left); any error raised counts as a failure."""
        timeout = self.attempts.timeout()
        self.client._count(retry=self.attempts.count > 1)
        try:
            try:
                yield timeout
            except TransportFailure as failure:
                self.delay = self.attempts.failed(failure=failure)
        except Exception:
            self.client._count(failure=True)
            raise
        if not self.done:
            log.debug(
                "retrying %s in %.2fs (attempt %d)", self.attempts.what, self.delay, self.attempts.count
            )

    def answer(self, response: WireResponse) -> None:
        """Decode a 200; any other status sets the wait before the next attempt, or raises."""
        if response.status == 200:
            self.result = self.contract.decode_response(response, self.count, self.options)
            self.done = True
        else:
            self.delay = self.attempts.failed(response=response)


class EmbeddingClient(_Base):
    """Embeddings from a remote endpoint; see the module docstring. Thread-safe.

    ``EmbeddingClient()`` reads the environment; keyword arguments override it
    (``EmbeddingClient(endpoint_url="http://localhost:8080", contract="search_term")``), or pass a
    :class:`ClientSettings`."""

    _http = HttpTransport

    def __init__(self, settings: ClientSettings | None = None, /, **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        self._pool: ThreadPoolExecutor | None = None

    def embed(
        self,
        texts: Sequence[str],
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool | None = None,
        prompt_name: str | None = None,
    ) -> np.ndarray:
        """Vectors for ``texts`` as float32 ``(len(texts), dim)``, rows in input order.

        Options left None are not sent (the server's defaults apply)."""
        options = _options(normalize, dimensions, truncate, prompt_name)
        return self._join(self._run(self.contract, texts, options))

    def embed_one(self, text: str, **options: Any) -> np.ndarray:
        """One text's vector, float32 ``(dim,)``."""
        return self.embed([text], **options)[0]

    def embed_sparse(
        self, texts: Sequence[str], *, truncate: bool | None = None, prompt_name: str | None = None
    ) -> list[dict[str, float]]:
        """BGE-M3's lexical weights of ``texts``: one ``{token_id_str: weight}`` dict per text, in
        input order (FlagEmbedding's ``lexical_weights``). Contract ``hf`` asks ``/invocations`` with
        ``parameters.return_sparse``; ``tei`` asks ``/embed_sparse``; the others cannot carry them."""
        return self.embed_multi(texts, ("sparse",), truncate=truncate, prompt_name=prompt_name)[
            "lexical_weights"
        ]

    def embed_multi(
        self,
        texts: Sequence[str],
        outputs: Sequence[str] | str = OUTPUTS,
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool | None = None,
        prompt_name: str | None = None,
        dtype: str | None = None,
    ) -> dict[str, Any]:
        """BGE-M3's ``outputs`` (any of ``dense``, ``sparse``, ``colbert``) of ``texts``, as
        FlagEmbedding's ``encode`` dict: ``dense_vecs`` ``(n, dim)``, ``lexical_weights`` (one dict
        per text), ``colbert_vecs`` (one ``(tokens - 1, dim)`` array per text); ``None`` for those not
        asked. Vectors are float32, or float16 with ``dtype="float16"`` (half the bytes on the wire)."""
        options = _options(normalize, dimensions, truncate, prompt_name)
        wanted, contracts, options = self._multi_plan(outputs, dtype, options)
        return merge_flags([part for c in contracts for part in self._run(c, texts, options)], wanted)

    def _run(self, contract: Contract, texts: Sequence[str], options: dict[str, Any]) -> list[Any]:
        """One result per request ``texts`` is split into, in order."""
        texts, ranges = self._plan(texts, options, contract)
        if len(ranges) <= 1 or self.settings.concurrency == 1:
            return [self._request(contract, texts, s, e, options) for s, e in ranges]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.settings.concurrency, thread_name_prefix="embedkit-client"
                )
        futures = [self._pool.submit(self._request, contract, texts, s, e, options) for s, e in ranges]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _request(
        self, contract: Contract, texts: list[str], start: int, end: int, options: dict[str, Any]
    ) -> Any:
        call = _Call(self, contract, texts, start, end, options)
        while True:
            with call.attempt() as timeout:
                call.answer(self._transport.send(call.body, timeout, **call.send_args))
            if call.done:
                return call.result
            time.sleep(call.delay)

    def close(self) -> None:
        """Close connections and worker threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._transport.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingClient({self.target!r}, contract={self.settings.contract!r})"


class AsyncEmbeddingClient(_Base):
    """The asyncio twin of :class:`EmbeddingClient`: ``await client.embed(texts)``.

    >>> async def main():                                                     # doctest: +SKIP
    ...     async with AsyncEmbeddingClient(endpoint_url="http://localhost:8080") as client:
    ...         return await client.embed(["hello", "world"])
    """

    _http = AsyncHttpTransport

    async def embed(self, texts: Sequence[str], **options: Any) -> np.ndarray:
        """See :meth:`EmbeddingClient.embed` (the same keyword options)."""
        return self._join(await self._run(self.contract, texts, _options(**options)))

    async def embed_one(self, text: str, **options: Any) -> np.ndarray:
        """One text's vector, float32 ``(dim,)``."""
        return (await self.embed([text], **options))[0]

    async def embed_sparse(
        self, texts: Sequence[str], *, truncate: bool | None = None, prompt_name: str | None = None
    ) -> list[dict[str, float]]:
        """See :meth:`EmbeddingClient.embed_sparse`."""
        found = await self.embed_multi(texts, ("sparse",), truncate=truncate, prompt_name=prompt_name)
        return found["lexical_weights"]

    async def embed_multi(
        self,
        texts: Sequence[str],
        outputs: Sequence[str] | str = OUTPUTS,
        *,
        dtype: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """See :meth:`EmbeddingClient.embed_multi` (the same keyword options)."""
        wanted, contracts, options = self._multi_plan(outputs, dtype, _options(**options))
        return merge_flags([part for c in contracts for part in await self._run(c, texts, options)], wanted)

    async def _run(self, contract: Contract, texts: Sequence[str], options: dict[str, Any]) -> list[Any]:
        """One result per request ``texts`` is split into, in order (``concurrency`` at a time)."""
        texts, ranges = self._plan(texts, options, contract)
        gate = asyncio.Semaphore(self.settings.concurrency)

        async def one(start: int, end: int) -> Any:
            async with gate:
                return await self._request(contract, texts, start, end, options)

        tasks = [asyncio.ensure_future(one(s, e)) for s, e in ranges]
        if not tasks:
            return []
        _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for t in tasks:  # the first failure in input order, else all results
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]

    async def _request(
        self, contract: Contract, texts: list[str], start: int, end: int, options: dict[str, Any]
    ) -> Any:
        call = _Call(self, contract, texts, start, end, options)
        sagemaker = isinstance(self._transport, SageMakerTransport)
        send = self._transport.send_async if sagemaker else self._transport.send
        while True:
            with call.attempt() as timeout:
                call.answer(await send(call.body, timeout, **call.send_args))
            if call.done:
                return call.result
            await asyncio.sleep(call.delay)

    async def close(self) -> None:
        """Close connections."""
        if isinstance(self._transport, SageMakerTransport):
            self._transport.close()
        else:
            await self._transport.close()

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncEmbeddingClient({self.target!r}, contract={self.settings.contract!r})"

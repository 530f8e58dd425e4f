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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
    normalize: bool | None,
    dimensions: int | None,
    truncate: bool | None,
    prompt_name: str | None,
    dtype: str | None = None,
):
    given = dict(
        normalize=normalize, dimensions=dimensions, truncate=truncate, prompt_name=prompt_name, dtype=dtype
    )
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

    def _failed(self, attempts: Any, failure: TransportFailure) -> float:
        try:
            return attempts.failed(failure=failure)
        except Exception:
            self._count(failure=True)
            raise

    def _what(self, start: int, end: int) -> str:
        return f"texts[{start}]" if end - start == 1 else f"texts[{start}:{end}]"

    def _outcome(
        self, response: WireResponse, count: int, options: dict[str, Any], contract: Contract
    ) -> Any:
        if response.status == 200:
            return contract.decode_response(response, count, options)
        return None

    def _send_args(self, contract: Contract) -> dict[str, Any]:
        """How the transport reaches ``contract``'s route, with which ``Accept``."""
        return {"route": contract.route, "accept": contract.accept}

    def _multi_plan(
        self,
        outputs: Sequence[str] | str,
        normalize: bool | None,
        dimensions: int | None,
        truncate: bool | None,
        prompt_name: str | None,
        dtype: str | None,
    ) -> tuple[tuple[str, ...], list[Contract], dict[str, Any]]:
        wanted = _outputs(outputs)
        options = _options(normalize, dimensions, truncate, prompt_name, _dtype(dtype))
        return wanted, self.contract.multi(wanted), options

    @staticmethod
    def _join(parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


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
        wanted, contracts, options = self._multi_plan(
            outputs, normalize, dimensions, truncate, prompt_name, dtype
        )
        parts: list[dict[str, Any]] = []
        for contract in contracts:
            parts.extend(self._run(contract, texts, options))
        return merge_flags(parts, wanted)

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
        body = contract.encode(texts[start:end], options)
        send_args = self._send_args(contract)
        attempts = self.policy.start(self.target, self._what(start, end))
        while True:
            timeout = attempts.timeout()
            self._count(retry=attempts.count > 1)
            try:
                response = self._transport.send(body, timeout, **send_args)
                result = self._outcome(response, end - start, options, contract)
                if result is not None:
                    return result
                delay = attempts.failed(response=response)
            except TransportFailure as failure:
                delay = self._failed(attempts, failure)
            except Exception:
                self._count(failure=True)
                raise
            log.debug("retrying %s in %.2fs (attempt %d)", attempts.what, delay, attempts.count)
            time.sleep(delay)

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

    async def embed(
        self,
        texts: Sequence[str],
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool | None = None,
        prompt_name: str | None = None,
    ) -> np.ndarray:
        """Vectors for ``texts`` as float32 ``(len(texts), dim)``, rows in input order."""
        options = _options(normalize, dimensions, truncate, prompt_name)
        return self._join(await self._run(self.contract, texts, options))

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
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool | None = None,
        prompt_name: str | None = None,
        dtype: str | None = None,
    ) -> dict[str, Any]:
        """See :meth:`EmbeddingClient.embed_multi`."""
        wanted, contracts, options = self._multi_plan(
            outputs, normalize, dimensions, truncate, prompt_name, dtype
        )
        parts: list[dict[str, Any]] = []
        for contract in contracts:
            parts.extend(await self._run(contract, texts, options))
        return merge_flags(parts, wanted)

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
        body = contract.encode(texts[start:end], options)
        send_args = self._send_args(contract)
        attempts = self.policy.start(self.target, self._what(start, end))
        sagemaker = isinstance(self._transport, SageMakerTransport)
        while True:
            timeout = attempts.timeout()
            self._count(retry=attempts.count > 1)
            try:
                if sagemaker:
                    response = await self._transport.send_async(body, timeout, **send_args)
                else:
                    response = await self._transport.send(body, timeout, **send_args)
                result = self._outcome(response, end - start, options, contract)
                if result is not None:
                    return result
                delay = attempts.failed(response=response)
            except TransportFailure as failure:
                delay = self._failed(attempts, failure)
            except Exception:
                self._count(failure=True)
                raise
            log.debug("retrying %s in %.2fs (attempt %d)", attempts.what, delay, attempts.count)
            await asyncio.sleep(delay)

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

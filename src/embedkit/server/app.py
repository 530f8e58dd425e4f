"""The ASGI app: routes of the container surface, the runtime surface, TEI and OpenAI.

The routes and their wire formats are tabled in docs/server.md ("Routes and wire formats").

>>> from embedkit.server import ServerSettings, create_app
>>> from embedkit.settings import EngineSettings
>>> app = create_app(EngineSettings(model="default"), ServerSettings())  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedkit import __version__
from embedkit.engine import Tokenized
from embedkit.errors import EmbedkitError, InputError, NotAcceptableError
from embedkit.server import codecs, images
from embedkit.server.contracts import hf, image, m3, openai, search, tei
from embedkit.server.contracts.common import EmbedRequest, asks_multi, texts_request
from embedkit.server.errors import (
    BodyTooLargeError,
    HookError,
    ModelCapabilityError,
    NotFoundError,
    UnauthorizedError,
    body_too_large,
    http_error,
    runtime_error,
    runtime_too_large,
    validation_error,
)
from embedkit.server.metrics import CONTENT_TYPE as METRICS_TYPE
from embedkit.server.openapi import build_spec
from embedkit.server.service import Service
from embedkit.server.settings import ServerSettings
from embedkit.settings import EngineSettings

log = logging.getLogger("embedkit.server")

JSON = codecs.JSON
Handler = Callable[..., Awaitable[Response]]  # (request) or, on the hot routes, (request, body)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it passes ``limit`` bytes, before any parsing."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise body_too_large(limit)
        except ValueError:
            raise InputError("Content-Length header is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


MIB = 1024 * 1024
DRAIN_SECONDS = 20.0


class DrainUnreadBody:
    """ASGI middleware: before an answer starts, read and discard what the client is still sending.

    An answer given before the body is read (413 for a body over the limit, 401, 404, 503...) would
    otherwise be followed by uvicorn closing a connection with unread data in it (it closes when the
    client sent ``Connection: close``, as urllib does), which the kernel turns into a reset: the
    client then reports "connection reset" or "broken pipe" instead of reading the answer. Draining
    is bounded by ``max_bytes`` (a declared ``Content-Length`` above it is not drained at all) and by
    ``DRAIN_SECONDS``; a client that announced ``Expect: 100-continue`` and was sent nothing yet is
    answered at once, without asking for its body (it waits for that answer before sending).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        state = {
            "done": declared is None and b"transfer-encoding" not in headers,  # no body at all
            "asked": False,
        }

        async def tracked_receive() -> Message:
            state["asked"] = True
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["done"] = True
            return message

        async def draining_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not state["done"]:
                expects = headers.get(b"expect", b"").lower() == b"100-continue"
                if not (expects and not state["asked"]):
                    await self._drain(receive, declared)
                state["done"] = True
            await send(message)

        await self.app(scope, tracked_receive, draining_send)

    async def _drain(self, receive: Receive, declared: bytes | None) -> None:
        try:
            if declared is not None and int(declared) > self.max_bytes:
                return
        except ValueError:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_SECONDS
        drained = 0
        while drained <= self.max_bytes:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


class HotRoutes:
    """ASGI: a POST to a query route (``/invocations``, ``/embed``, ``/v1/embeddings``) with a
    ``Content-Length`` within ``max_body_bytes`` goes straight to its endpoint; everything else
    (other routes and methods, chunked or oversized bodies, ``Expect: 100-continue``, lifespan)
    through the body drain and Starlette's stack.

    The body is read whole before the endpoint runs, so an answer never leaves unread data behind
    (the drain's job) and the endpoint gets it as bytes. The endpoints answer every error
    themselves (``EmbedServer._wrap``), so Starlette's error and exception middlewares and its
    router have nothing to add here, and the answer goes out as two ASGI messages. Each layer
    skipped saves CPU on every query: after each forward pass the caches are cold, and each layer
    of coroutines costs several times its warm price (docs/serving-performance.md). At c=32 the
    event loop's turnaround between two batches is on the critical path: this path served 4% more
    requests/s (alternating runs) than the same endpoints behind the drain and a ``Request`` stream.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: dict[str, Handler],
        max_body_bytes: int,
        admit: Callable[[list[tuple[bytes, bytes]]], bool] | None = None,
    ) -> None:
        self.app = app
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        # With an API key: a request without it takes the full stack, which refuses it before
        # reading its body (and drains the body), rather than be read whole here first.
        self.admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            endpoint = self.routes.get(path)
            if endpoint is not None and self._takes(scope["headers"]):
                body = await _whole_body(receive)
                if body is None:
                    return  # the client went away
                response = await endpoint(Request(scope, receive), body)
                if type(response) is Response:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": response.status_code,
                            "headers": response.raw_headers,
                        }
                    )
                    await send({"type": "http.response.body", "body": response.body})
                else:
                    await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _takes(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether a request with these headers is read whole here: its length is declared and
        within the limit, and it does not wait for a ``100 Continue``."""
        length = -1
        for name, value in headers:
            if name == b"content-length":
                length = int(value) if value.isdigit() else -1
            elif name == b"expect" or name == b"transfer-encoding":
                return False
        return 0 <= length <= self.max_body_bytes and (self.admit is None or self.admit(headers))


async def _whole_body(receive: Receive) -> bytes | None:
    """The request's body from ASGI ``receive`` messages; ``None`` when the client disconnects."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(codecs.dumps(obj), status_code=status, headers=headers, media_type=JSON)


class EmbedServer:
    """Routes over a :class:`Service`; ``app`` is the ASGI application (Starlette behind the
    hot-route dispatch and the body drain)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings
        self.dlc = self.settings.hf_mode == "dlc-exact"
        self.tei = self.settings.hf_mode == "tei"
        self._key = (self.settings.api_key or "").encode() or None
        self._names = self.settings.endpoint_names
        hot = {  # the query routes: straight to the endpoint (HotRoutes)
            "/invocations": self._wrap("/invocations", self._invocations, dlc=self.dlc),
            "/embed": self._wrap("/embed", self._tei),
            "/v1/embeddings": self._wrap("/v1/embeddings", self._openai),
        }
        routes = [
            Route("/ping", self._health, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
            *(Route(path, endpoint, methods=["POST"]) for path, endpoint in hot.items()),
            Route("/endpoints/{name}/invocations", self._runtime, methods=["POST"]),
            Route("/execution-parameters", self._execution_parameters, methods=["GET"]),
            Route("/embed_sparse", self._wrap("/embed_sparse", self._tei_sparse), methods=["POST"]),
            Route("/info", self._wrap("/info", self._info), methods=["GET"]),
            Route("/metrics", self._wrap("/metrics", self._metrics), methods=["GET"]),
            Route("/openapi.json", self._openapi, methods=["GET"]),
        ]
        drain_bytes = max(4 * self.settings.max_body_bytes, 32 * MIB)
        self.starlette = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception},
            lifespan=self._lifespan,
        )
        self.app: ASGIApp = HotRoutes(
            DrainUnreadBody(self.starlette, max_bytes=drain_bytes),
            hot,
            self.settings.max_body_bytes,
            admit=self._authorized if self._key is not None else None,
        )

    # ------------------------------------------------------------- plumbing
    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette):
        self.service.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.service.stop)
            log.info("shutdown complete: %d requests answered", self.service.metrics.answered)

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether raw ASGI ``headers`` carry the API key (the bearer token, else ``X-Api-Key``),
        or no key is set."""
        if self._key is None:
            return True
        auth = key = None
        for name, value in headers:
            if name == b"authorization" and auth is None:
                auth = value
            elif name == b"x-api-key" and key is None:
                key = value
        token = auth[7:] if auth is not None and auth[:7].lower() == b"bearer " else (key or b"")
        return hmac.compare_digest(token, self._key)

    def _check_auth(self, request: Request) -> None:
        if not self._authorized(request.scope["headers"]):
            raise UnauthorizedError("missing or wrong API key; send 'Authorization: Bearer <key>'")

    async def _answer(
        self, request: Request, fn: Handler, dlc: bool = False, body: bytes | None = None
    ) -> Response:
        """``fn``'s answer to ``request`` (with its ``body`` when already read), or the error's."""
        try:
            self._check_auth(request)
            return await (fn(request) if body is None else fn(request, body))
        except Exception as exc:
            status, body, headers = http_error(exc, dlc=dlc)
            return json_response(body, status, headers)

    async def _body(self, request: Request, body: bytes | None) -> bytes:
        """The request's body: ``body`` when :class:`HotRoutes` read it already, else read now."""
        return body if body is not None else await read_body(request, self.settings.max_body_bytes)

    def _wrap(self, route: str, fn: Handler, dlc: bool = False) -> Handler:
        observe = self.service.metrics.observe

        async def endpoint(request: Request, body: bytes | None = None) -> Response:
            t0 = time.perf_counter()
            response = await self._answer(request, fn, dlc, body)
            observe(route, response.status_code, time.perf_counter() - t0)
            return response

        return endpoint

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = (
            "no such route" if status == 404 else f"method {request.method} not allowed on {request.url.path}"
        )
        code, body, headers = http_error(NotFoundError(message, status))
        self.service.metrics.observe("unmatched", code, 0.0)
        return json_response(body, code, headers)

    # --------------------------------------------------------------- routes
    async def _health(self, request: Request) -> Response:
        if self.service.healthy:
            return Response(b"", media_type=JSON)
        status, body, headers = http_error(_not_ready(self.service))
        return json_response(body, status, headers)

    async def _execution_parameters(self, request: Request) -> Response:
        """What a Batch Transform job asks before sending work (no API key: SageMaker sends none)."""
        return json_response(
            {
                "MaxConcurrentTransforms": 1,
                "BatchStrategy": "MULTI_RECORD",
                "MaxPayloadInMB": max(1, self.settings.max_body_bytes // MIB),
            }
        )

    async def _invocations(self, request: Request, body: bytes | None = None) -> Response:
        svc = self.service
        svc.require_ready()
        accept_raw = request.headers.get("accept")
        ctype = request.headers.get("content-type")
        handler = svc.handler
        lines = codecs.line_format(ctype) if handler is None and not self.dlc else None
        if handler is None:
            if lines == codecs.JSONLINES and (not accept_raw or accept_raw.strip() == "*/*"):
                accept = codecs.JSONLINES  # a JSON Lines body is answered line for line (Batch Transform)
            else:
                accept = codecs.negotiate(accept_raw)
            if self.dlc and accept != JSON:
                raise NotAcceptableError(
                    "token-level (dlc-exact) answers are JSON only; send Accept: application/json"
                )
        body = await self._body(request, body)
        if handler is None and image.is_image_type(ctype):  # a CLIP model: the body is an image
            prediction = await images.predict_body(self.service, body)
            return Response(codecs.encode(prediction, accept), media_type=accept)
        if handler is None:
            payload = codecs.decode(body, ctype)
            if lines:
                prediction = await self._predict_lines(payload["inputs"])
            else:
                prediction = await self._predict(payload, accept=accept)
            return Response(self._encode(prediction, accept), media_type=accept)
        return await self._custom(handler, body, ctype, accept_raw)

    def _encode(self, prediction: Any, accept: str) -> bytes:
        """The answer's bytes; one with lexical weights or ColBERT vectors is refused (413) when
        it is over ``max_response_bytes`` (dense-only answers are not checked)."""
        if not isinstance(prediction, m3.MultiAnswer):
            return codecs.encode(prediction, accept)
        m3.check_accept(prediction.outputs, len(prediction.vectors), accept)
        body = prediction.encode(accept)
        limit = self.settings.max_response_bytes
        if len(body) > limit:
            raise m3.too_large(
                len(body), limit, accept=accept, outputs=prediction.outputs, dtype=prediction.dtype
            )
        return body

    async def _hook(self, name: str, fn: Any, *args: Any) -> Any:
        """Run one of the user's hooks on the inference worker; what it raises answers the request."""
        try:
            return await self.service.call(fn, *args)
        except EmbedkitError:
            raise  # embedkit's own errors (a dead worker, bad input to the engine) keep their status
        except Exception as exc:
            log.warning("%s raised %s: %s", name, type(exc).__name__, exc, exc_info=exc)
            raise HookError(name, exc) from exc

    async def _custom(self, h: Any, body: bytes, ctype: str | None, accept_raw: str | None) -> Response:
        svc = self.service
        accept_arg = (
            JSON if not accept_raw or accept_raw.strip() == "*/*" else accept_raw
        )  # as the toolkits do
        ctype_arg = ctype or JSON
        if h.transform_fn is not None:
            result = await self._hook("transform_fn", h.transform_fn, svc.model, body, ctype_arg, accept_arg)
            return _user_response(result, accept_arg)
        if h.input_fn is not None:
            data = await self._hook("input_fn", h.input_fn, body, ctype_arg)
        else:
            data = codecs.decode(body, ctype)
        if h.predict_fn is not None:
            prediction = await self._hook("predict_fn", h.predict_fn, data, svc.model)
        else:
            prediction = await self._predict(data, from_user=h.input_fn is not None)
        if h.output_fn is not None:
            if isinstance(prediction, m3.MultiAnswer):  # output_fn sees the JSON answer's dict
                prediction = prediction.to_json()
            return _user_response(
                await self._hook("output_fn", h.output_fn, prediction, accept_arg), accept_arg
            )
        accept = codecs.negotiate(accept_raw)
        return Response(self._encode(prediction, accept), media_type=accept)

    async def _predict(self, payload: Any, from_user: bool = False, accept: str | None = None) -> Any:
        """embedkit's default predict: route a decoded payload to its contract and embed it.
        ``accept`` (when already known) lets a BGE-M3 request be refused before any compute."""
        limits = self.service.limits
        if isinstance(payload, dict):
            if "search_term" in payload:
                req = search.parse(payload, limits)
                if req.multi:
                    return await self._multi(req, accept, "embedding" if req.single else "embeddings")
                vecs, _ = await self.service.embed(req)
                return search.respond(req, vecs)
            if "inputs" not in payload:
                keys = sorted(payload)[:10]
                raise InputError(
                    f'request body needs an "inputs" field (or "search_term"); it has {keys}', field="inputs"
                )
            if image.wants_images(payload):  # {"inputs": {"image": <base64>}} (a CLIP model)
                return await images.predict_json(self.service, payload)
            # tei: TEI's own request options ({"inputs", "normalize", "truncate", ...}) as its container takes
            if self.tei and asks_multi(payload.get("parameters")):
                raise InputError(
                    '--hf-mode tei answers {"inputs"} as TEI\'s /embed does (dense vectors only); POST '
                    "/embed_sparse for lexical weights, or run the server with --hf-mode embeddings for "
                    "parameters.return_sparse / return_colbert_vecs / dtype",
                    field="parameters",
                )
            req = tei.parse(payload, limits) if self.tei else hf.parse(payload, limits)
        elif from_user and isinstance(payload, (list, str)):  # what a custom input_fn may return
            req = texts_request(payload, field="inputs", limits=limits)
        else:
            raise InputError(
                f"request body must be a JSON object such as {hf.EXAMPLE}, got {type(payload).__name__}"
            )
        if self.dlc:
            if req.multi or req.dtype != "float32":
                raise InputError(
                    "--hf-mode dlc-exact answers token vectors as the Hugging Face container does; "
                    "parameters.return_sparse / return_colbert_vecs / dtype need --hf-mode embeddings",
                    field="parameters",
                )
            return hf.respond_dlc(req, await self.service.token_embeddings(req))
        if req.multi:
            return await self._multi(req, accept)
        vecs, _ = await self.service.embed(req)
        return tei.respond(req, vecs) if self.tei else hf.respond(req, vecs)

    async def _multi(self, req: EmbedRequest, accept: str | None, key: str = "embeddings") -> m3.MultiAnswer:
        """BGE-M3's outputs for ``req``. With ``accept`` known, a type that cannot carry them (406)
        or an answer certain to be over ``max_response_bytes`` (413) is refused before any compute."""
        limit = self.settings.max_response_bytes
        before = None
        if accept is not None:
            m3.check_accept(req.outputs, len(req.texts), accept)

            def before(tok: Tokenized) -> None:
                dense_dim, colbert_dim = self.service.output_dims()
                least = m3.least_bytes(
                    tok.lengths,
                    req.outputs,
                    dense_dim=req.dimensions or dense_dim,
                    colbert_dim=colbert_dim,
                    accept=accept,
                    dtype=req.dtype,
                )
                if least > limit:
                    raise m3.too_large(
                        least, limit, accept=accept, outputs=req.outputs, dtype=req.dtype, at_least=True
                    )

        found, _ = await self.service.embed_multi(req, before)
        return m3.MultiAnswer(found, req.outputs, single=req.single, dtype=req.dtype, dense_key=key)

    async def _predict_lines(self, texts: list[str]) -> Any:
        """A body of one record per line (CSV, JSON Lines: what a Batch Transform job sends): any
        number of lines up to ``max_body_bytes``, embedded ``max_client_batch_size`` at a time, in
        order; the answer holds one vector per line."""
        step = self.settings.max_client_batch_size
        parts = []
        for start in range(0, len(texts), step):
            try:
                vecs, _ = await self.service.embed(EmbedRequest(texts[start : start + step]))
            except InputError as exc:
                raise _shift_index(exc, start) from None
            parts.append(vecs)
        vecs = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return vecs if self.tei else {"embeddings": vecs}

    async def _runtime(self, request: Request) -> Response:
        t0 = time.perf_counter()
        name = request.path_params["name"]
        limit = self.settings.max_body_bytes
        too_large = False

        async def invoke(req: Request) -> Response:
            nonlocal too_large
            try:
                body = await read_body(req, limit)
            except BodyTooLargeError:
                too_large = True  # the runtime refuses it itself; no model sees it
                raise
            return await self._invocations(req, body=body)

        if self._names is not None and name not in self._names:
            status, out, headers = validation_error(
                f"Endpoint {name} of account 000000000000 not found. This server answers "
                f"{', '.join(sorted(self._names))} (EMBEDKIT_ENDPOINT_NAME)."
            )
            response = Response(out, status, headers, media_type=JSON)
        else:
            response = await self._answer(request, invoke, self.dlc)
            if too_large:
                status, out, headers = runtime_too_large(limit)
                response = Response(out, status, headers, media_type=JSON)
            elif response.status_code >= 400:
                extra = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
                status, out, headers = runtime_error(response.status_code, response.body, extra)
                response = Response(out, status, headers, media_type=JSON)
            else:
                response.headers["x-Amzn-Invoked-Production-Variant"] = "AllTraffic"
        self.service.metrics.observe(
            "/endpoints/{name}/invocations", response.status_code, time.perf_counter() - t0
        )
        return response

    async def _tei(self, request: Request, body: bytes | None = None) -> Response:
        self.service.require_ready()
        payload = codecs.parse_json(await self._body(request, body))
        req = tei.parse(payload, self.service.limits)
        vecs, _ = await self.service.embed(req)
        return Response(codecs.dumps(tei.respond(req, vecs)), media_type=JSON)

    async def _tei_sparse(self, request: Request) -> Response:
        svc = self.service
        svc.require_ready()
        payload = codecs.parse_json(await read_body(request, self.settings.max_body_bytes))
        req = tei.parse_sparse(payload, svc.limits)
        try:
            svc.check_outputs(req.outputs)
        except InputError as exc:  # TEI answers a route its model cannot serve with 424
            raise ModelCapabilityError(f"/embed_sparse: {exc.message}") from None
        found, _ = await svc.embed_multi(req)
        body = codecs.dumps(tei.respond_sparse(found.sparse or []))
        limit = self.settings.max_response_bytes
        if len(body) > limit:
            raise m3.too_large(len(body), limit, accept=JSON, outputs=req.outputs, binary=False)
        return Response(body, media_type=JSON)

    async def _openai(self, request: Request, body: bytes | None = None) -> Response:
        svc = self.service
        svc.require_ready()
        payload = codecs.parse_json(await self._body(request, body))
        req, fmt = openai.parse(payload, svc.limits)
        vecs, tok = await svc.embed(req)
        name = svc.embedder.model.name if svc.embedder is not None else "custom"
        return Response(codecs.dumps(openai.respond(vecs, fmt, name, tok.num_tokens)), media_type=JSON)

    async def _info(self, request: Request) -> Response:
        svc = self.service
        info: dict[str, Any] = {
            "version": __version__,
            "ready": svc.healthy,
            "hf_mode": self.settings.hf_mode,
            "max_body_bytes": self.settings.max_body_bytes,
            "max_client_batch_size": self.settings.max_client_batch_size,
            "max_response_bytes": self.settings.max_response_bytes,
        }
        if svc.embedder is not None:
            emb = svc.embedder
            info.update(
                model=emb.model.name,
                dimension=emb.dimension,
                max_seq_length=emb.max_seq_length,
                normalize=emb.normalize,
                precision=emb.precision,
                backend=emb.backend,
                backend_plan=emb.backend_note,
                unpadded=emb.unpadded,
                forward_cost_tokens=(
                    None if emb.forward_cost_tokens is None else round(emb.forward_cost_tokens)
                ),
                torch_one_thread_tokens=getattr(emb, "torch_one_thread_tokens", 0),
                merged_batches=getattr(emb, "packed_note", ""),
                device=str(emb.device),
                content_hash=emb.content_hash,
                outputs=list(emb.outputs),
                modality="image+text" if hasattr(emb, "encode_images") else "text",
            )
        return json_response(info)

    async def _metrics(self, request: Request) -> Response:
        self.service.metrics.queue_tokens.set(
            self.service.batcher.queued_tokens if self.service.batcher else 0
        )
        return Response(self.service.metrics.render(), media_type=METRICS_TYPE)

    async def _openapi(self, request: Request) -> Response:
        return json_response(
            build_spec(self.service.limits, dlc=self.dlc, auth=self._key is not None, tei=self.tei)
        )


def _not_ready(service: Service) -> Exception:
    try:
        service.require_ready()
    except Exception as exc:
        return exc
    return RuntimeError("unreachable")


def _shift_index(exc: InputError, offset: int) -> InputError:
    """An error about ``inputs[i]`` of a slice starting at ``offset``, renamed to the whole body's index."""
    field, index = exc.context.get("field"), exc.context.get("index")
    if offset and field is not None and isinstance(index, int):
        exc.message = exc.message.replace(f"{field}[{index}]", f"{field}[{index + offset}]", 1)
        exc.args = (exc.message,)
        exc.context["index"] = index + offset
    return exc


def _user_response(result: Any, accept: str) -> Response:
    """What a user ``output_fn`` / ``transform_fn`` returned: bytes, str, or ``(body, content_type)``."""
    ctype = accept.split(",")[0].split(";")[0].strip() or JSON
    if isinstance(result, tuple) and len(result) == 2:
        result, ctype = result
    if isinstance(result, str):
        result = result.encode("utf-8")
    elif not isinstance(result, (bytes, bytearray, memoryview)):
        result = codecs.dumps(result)
    return Response(bytes(result), media_type=ctype if ctype != "*/*" else JSON)


def create_app(
    engine: EngineSettings,
    server: ServerSettings,
    *,
    model_dir: Path | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> ASGIApp:
    """The ASGI app for these settings; the model loads when the app's lifespan starts."""
    service = Service(engine, server, model_dir=model_dir, on_fatal=on_fatal)
    return EmbedServer(service).app

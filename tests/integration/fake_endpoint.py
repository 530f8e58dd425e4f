"""A real (tiny) embedding server for client tests: starlette on uvicorn, on a random loopback port.

It speaks the hf, search_term and openai contracts plus SageMaker's runtime surface, answers with
deterministic vectors (``fake_vector(text)``), records every request, and misbehaves on purpose:
``endpoint.fail(["429", "503", "sleep", "400"])`` makes the next calls answer those, in order, before
answering normally again. No mocks: the client under test goes through real sockets and real HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import free_port

DIM = 8
SLOW_SECONDS = 1.5  # how long a "sleep" answer takes; client tests use a shorter request_timeout
MODEL_ERROR = "ModelError:http://internal.amazon.com/coral/com.amazon.sagemaker/"


def fake_vector(text: str) -> np.ndarray:
    """The fake server's deterministic float32 embedding of ``text``."""
    raw = np.frombuffer(hashlib.sha256(text.encode()).digest()[: DIM * 2], dtype=np.uint16)
    return (raw.astype(np.float32) / 65535.0 - 0.5).astype(np.float32)


@dataclass
class Call:
    path: str
    body_bytes: int
    texts: list[str]
    headers: dict[str, str]


@dataclass
class FakeEndpoint:
    """The server's script and records; see the module docstring."""

    endpoint_name: str = "fake-endpoint"
    token_level: bool = False  # answer hf like the HF container's feature-extraction (tokens, dim)
    reverse_openai: bool = True  # openai "data" items out of order: clients must sort by index
    calls: list[Call] = field(default_factory=list)
    _plan: deque = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, actions: list[str]) -> None:
        """Queue answers for the next calls: "429", "503", "400", "500", "sleep", "garbage", "short"."""
        with self._lock:
            self._plan.extend(actions)

    def reset(self) -> None:
        with self._lock:
            self._plan.clear()
            self.calls.clear()
        self.token_level = False

    def _next(self) -> str:
        with self._lock:
            return self._plan.popleft() if self._plan else "ok"


def _texts_of(payload: object) -> tuple[list[str], str]:
    if isinstance(payload, dict):
        for key in ("inputs", "search_term", "input"):
            if key in payload:
                value = payload[key]
                return ([value] if isinstance(value, str) else list(value)), key
    raise ValueError("no inputs / search_term / input field")


def _container_answer(ep: FakeEndpoint, path: str, action: str, texts: list[str], key: str) -> Response:
    """What a model container answers on /invocations (or /v1/embeddings) for this action."""
    if action == "429":
        return JSONResponse({"error": "queue full", "error_type": "Overloaded"}, 429, {"Retry-After": "0"})
    if action == "503":
        return JSONResponse({"error": "model loading", "error_type": "Unhealthy"}, 503)
    if action == "503-long":
        return JSONResponse(
            {"error": "model loading", "error_type": "Unhealthy"}, 503, {"Retry-After": "3600"}
        )
    if action == "400":
        return JSONResponse({"error": "inputs[0] is not allowed here", "error_type": "Validation"}, 400)
    if action == "500":
        return JSONResponse({"error": "internal error", "error_type": "Internal"}, 500)
    if action == "garbage":
        return Response(b"<html>not json</html>", 200, media_type="text/html")
    vecs = [fake_vector(t) for t in texts]
    if action == "short":
        vecs = vecs[:-1]
    if key == "input":
        items = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]
        if ep.reverse_openai:
            items.reverse()
        if items:  # one item as base64, as OpenAI answers for encoding_format=base64
            items[0]["embedding"] = base64.b64encode(
                np.asarray(items[0]["embedding"], "<f4").tobytes()
            ).decode()
        return JSONResponse({"object": "list", "data": items, "model": "fake", "usage": {}})
    if key == "search_term" and len(texts) == 1 and "[" not in path:
        return JSONResponse({"embedding": vecs[0].tolist()})
    if key == "inputs" and ep.token_level:
        # (1, tokens, dim) per input whose token mean is the vector: the HF container's shape
        return JSONResponse([[[(v + 0.25).tolist(), (v - 0.25).tolist()]] for v in vecs])
    return JSONResponse({"embeddings": [v.tolist() for v in vecs]})


async def _serve(ep: FakeEndpoint, request: Request, path: str) -> Response:
    body = await request.body()
    action = ep._next()
    try:
        payload = json.loads(body)
        texts, key = _texts_of(payload)
        if key == "search_term" and isinstance(payload["search_term"], list):
            path += "[list]"
    except ValueError as exc:
        ep.calls.append(Call(path, len(body), [], dict(request.headers)))
        return JSONResponse({"error": f"bad request: {exc}", "error_type": "Validation"}, 400)
    ep.calls.append(Call(path, len(body), texts, dict(request.headers)))
    if action == "sleep":
        await asyncio.sleep(SLOW_SECONDS)
        action = "ok"
    return _container_answer(ep, path, action, texts, key)


def build_app(ep: FakeEndpoint) -> Starlette:
    async def ping(request: Request) -> Response:
        return Response(b"", 200)

    async def invocations(request: Request) -> Response:
        return await _serve(ep, request, "/invocations")

    async def openai(request: Request) -> Response:
        return await _serve(ep, request, "/v1/embeddings")

    async def runtime(request: Request) -> Response:
        """SageMaker's runtime surface, errors shaped as boto3 parses them (docs/sagemaker.md, "The
        runtime surface")."""
        name = request.path_params["name"]
        if name != ep.endpoint_name:
            return JSONResponse(
                {"message": f"Endpoint {name} of account 123456789012 not found."},
                400,
                {"x-amzn-ErrorType": "ValidationError:"},
            )
        if ep._plan and ep._plan[0] == "throttle":
            ep._next()
            ep.calls.append(Call("/runtime", 0, [], dict(request.headers)))
            return JSONResponse(
                {"message": "Rate exceeded"}, 429, {"x-amzn-ErrorType": "ThrottlingException:"}
            )
        inner = await _serve(ep, request, "/runtime")
        if inner.status_code == 200:
            return Response(inner.body, 200, {"Content-Type": "application/json"})
        original = inner.body.decode()
        return JSONResponse(
            {
                "ErrorCode": "CLIENT_ERROR_FROM_MODEL"
                if inner.status_code < 500
                else "SERVER_ERROR_FROM_MODEL",
                "Message": f'Received client error ({inner.status_code}) from primary with message "{original}".',
                "OriginalMessage": original,
                "OriginalStatusCode": inner.status_code,
                "LogStreamArn": f"arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/Endpoints/{name}",
            },
            424,
            {"x-amzn-ErrorType": MODEL_ERROR},
        )

    routes = [
        Route("/ping", ping, methods=["GET"]),
        Route("/invocations", invocations, methods=["POST"]),
        Route("/v1/embeddings", openai, methods=["POST"]),
        Route("/endpoints/{name}/invocations", runtime, methods=["POST"]),
    ]
    return Starlette(routes=routes)


class RunningServer:
    """uvicorn serving ``app`` in a background thread on a random loopback port."""

    def __init__(self, app: Starlette) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="fake-endpoint")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake endpoint did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=SLOW_SECONDS + 10)

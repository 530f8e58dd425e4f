"""How request bodies travel: plain HTTP (httpx) or SageMaker's runtime API (boto3, imported only
when that transport is built). A transport sends one body and returns a :class:`WireResponse` (any
status) or raises :class:`TransportFailure`; retrying lives above it (:mod:`embedkit.client.retry`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import urlsplit

import httpx

from embedkit.client.retry import TransportFailure, WireResponse
from embedkit.client.settings import ClientSettings
from embedkit.errors import ConfigError

log = logging.getLogger(__name__)

JSON = "application/json"


def resolve_url(endpoint_url: str, default_path: str) -> str:
    """A bare base URL gets the contract's path; a URL with a path is used as given.

    >>> resolve_url("http://localhost:8080", "/invocations")
    'http://localhost:8080/invocations'
    >>> resolve_url("http://api/v1", "/v1/embeddings")
    'http://api/v1/embeddings'
    >>> resolve_url("http://host/endpoints/e/invocations", "/invocations")
    'http://host/endpoints/e/invocations'
    """
    path = urlsplit(endpoint_url).path.rstrip("/")
    base = endpoint_url.rstrip("/")
    if not path:
        return base + default_path
    if path.endswith("/v1") and default_path == "/v1/embeddings":
        return base + "/embeddings"
    return base


def base_url(endpoint_url: str, default_path: str) -> str | None:
    """The server's base URL, from which its other routes (``/embed_sparse``) are reached: the URL
    itself when it has no path, the URL less ``default_path`` when it ends with it, else ``None``.

    >>> base_url("http://localhost:8080", "/embed"), base_url("http://h/embed", "/embed")
    ('http://localhost:8080', 'http://h')
    >>> base_url("http://host/endpoints/e/invocations", "/embed") is None
    True
    """
    base = endpoint_url.rstrip("/")
    path = urlsplit(base).path
    if not path:
        return base
    return base[: -len(default_path)] if path.endswith(default_path) else None


def _headers(settings: ClientSettings) -> dict[str, str]:
    headers = {"Content-Type": JSON, "Accept": JSON}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    return headers


def _httpx_failure(exc: httpx.TransportError, url: str, timeout: float) -> TransportFailure:
    if isinstance(exc, httpx.TimeoutException):
        return TransportFailure(f"{type(exc).__name__} after {timeout:.1f}s", timeout=True)
    return TransportFailure(f"{type(exc).__name__}: {exc or 'connection failed'}")


class _PooledHttp:
    name = "http"
    _client_class: Any = httpx.Client

    def __init__(self, settings: ClientSettings, default_path: str) -> None:
        self.url = resolve_url(str(settings.endpoint_url), default_path)
        self.base = base_url(str(settings.endpoint_url), default_path)
        limits = httpx.Limits(max_connections=max(10, settings.concurrency * 2))
        self._client = self._client_class(
            headers=_headers(settings), timeout=settings.request_timeout, limits=limits
        )

    def _target(self, route: str | None, accept: str) -> tuple[str, dict[str, str] | None]:
        """The URL and extra headers of one request (``route``: another route of the server)."""
        url = self.url
        if route is not None:
            if self.base is None:
                raise ConfigError(
                    f"{route} cannot be reached from EMBEDKIT_ENDPOINT_URL={self.url!r} (a URL with its "
                    "own path); give the server's base URL (http://host:port)"
                )
            url = self.base + route
        return url, ({"Accept": accept} if accept != JSON else None)


class HttpTransport(_PooledHttp):
    """POSTs JSON bodies to one URL with a pooled :class:`httpx.Client`."""

    def send(
        self, body: bytes, timeout: float, *, route: str | None = None, accept: str = JSON
    ) -> WireResponse:
        url, headers = self._target(route, accept)
        try:
            r = self._client.post(url, content=body, timeout=timeout, headers=headers)
        except httpx.TransportError as exc:
            raise _httpx_failure(exc, self.url, timeout) from exc
        return WireResponse(r.status_code, r.content, r.headers)

    def close(self) -> None:
        self._client.close()


class AsyncHttpTransport(_PooledHttp):
    """The asyncio twin of :class:`HttpTransport` (:class:`httpx.AsyncClient`)."""

    _client_class = httpx.AsyncClient

    async def send(
        self, body: bytes, timeout: float, *, route: str | None = None, accept: str = JSON
    ) -> WireResponse:
        url, headers = self._target(route, accept)
        try:
            r = await self._client.post(url, content=body, timeout=timeout, headers=headers)
        except httpx.TransportError as exc:
            raise _httpx_failure(exc, self.url, timeout) from exc
        return WireResponse(r.status_code, r.content, r.headers)

    async def close(self) -> None:
        await self._client.aclose()


class SageMakerTransport:
    """``sagemaker-runtime`` ``InvokeEndpoint`` through boto3, with boto3's own retries turned off
    (the client retries in one place). A ``ModelError`` becomes the container's own status and body
    (``OriginalStatusCode`` / ``OriginalMessage``)."""

    name = "sagemaker"

    def __init__(self, settings: ClientSettings) -> None:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import NoRegionError

        self.endpoint_name = str(settings.sagemaker_endpoint)
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=min(10.0, settings.request_timeout),
            read_timeout=settings.request_timeout,
            max_pool_connections=max(10, settings.concurrency * 2),
        )
        try:
            self._client = boto3.session.Session().client(
                "sagemaker-runtime",
                region_name=settings.region,
                endpoint_url=settings.sagemaker_endpoint_url,
                config=config,
            )
        except NoRegionError:
            raise ConfigError(
                f"No AWS region for SageMaker endpoint {self.endpoint_name!r}: set AWS_REGION "
                "(or EMBEDKIT_REGION / --region)"
            ) from None

    def send(
        self, body: bytes, timeout: float, *, route: str | None = None, accept: str = JSON
    ) -> WireResponse:
        if route is not None:
            raise ConfigError(
                f"{route} cannot be reached through SageMaker's InvokeEndpoint (it calls /invocations "
                "only); use contract hf, whose /invocations parameters carry BGE-M3's outputs"
            )
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        try:
            r = self._client.invoke_endpoint(
                EndpointName=self.endpoint_name, Body=body, ContentType=JSON, Accept=accept
            )
            return WireResponse(200, r["Body"].read(), {"content-type": r.get("ContentType", JSON)})
        except ClientError as exc:
            return _client_error_response(exc.response)
        except NoCredentialsError:
            raise ConfigError(
                f"No AWS credentials for SageMaker endpoint {self.endpoint_name!r}: configure the usual "
                "AWS chain (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an IAM role), or use "
                "EMBEDKIT_ENDPOINT_URL for a local server, which needs none"
            ) from None
        except (ReadTimeoutError, ConnectTimeoutError) as exc:
            raise TransportFailure(f"{type(exc).__name__}: {exc}", timeout=True) from exc
        except BotoCoreError as exc:  # EndpointConnectionError, ConnectionClosedError, ...
            raise TransportFailure(f"{type(exc).__name__}: {exc}") from exc

    async def send_async(
        self, body: bytes, timeout: float, *, route: str | None = None, accept: str = JSON
    ) -> WireResponse:
        return await asyncio.to_thread(self.send, body, timeout, route=route, accept=accept)

    def close(self) -> None:
        self._client.close()


def _client_error_response(resp: dict[str, Any]) -> WireResponse:
    """A botocore error -> the status and body the caller should see."""
    code = resp.get("Error", {}).get("Code", "")
    http_status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 500))
    headers = {k.lower(): v for k, v in resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).items()}
    if code == "ModelError":
        status = int(resp.get("OriginalStatusCode") or http_status)
        original = resp.get("OriginalMessage") or resp.get("Error", {}).get("Message", "")
        return WireResponse(status, str(original).encode(), {}, origin="ModelError")
    message = resp.get("Error", {}).get("Message", "")
    body = json.dumps({"message": message, "type": code}).encode()
    status = 429 if code in ("ThrottlingException", "Throttling") else http_status
    retry = {"retry-after": headers["retry-after"]} if "retry-after" in headers else {}
    return WireResponse(status, body, retry, origin=code or "SageMaker")

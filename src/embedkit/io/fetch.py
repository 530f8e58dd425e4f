"""A bounded concurrent fetcher of image bytes from ``http(s)://``, ``s3://``, ``file://`` URLs or paths.

Used by the batch job (img2dataset URL lists) and by the server (``{"inputs": {"url": ...}}``).
Failures are :class:`~embedkit.errors.InvalidImageError` (``fetch failed``, ``oversized image``),
like the decoding failures of :mod:`embedkit.io.image_decode`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from embedkit.errors import InvalidImageError
from embedkit.io.fs import get_fs, is_remote

DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20


@dataclass(frozen=True)
class FetchSettings:
    """How URLs are fetched: parallelism, per-try timeout (seconds), retries, size cap (bytes)."""

    workers: int = 16
    timeout: float = 10.0
    retries: int = 2
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    backoff: float = 0.5  # seconds before the first retry, doubled after each
    schemes: tuple[str, ...] = ("http", "https", "s3", "file")


class _Retry(Exception):
    """A failure worth another try (timeout, connection error, 429, 5xx)."""


class Fetcher:
    """Fetch image bytes from ``http(s)://``, ``s3://``, ``file://`` URLs or paths, as
    :class:`FetchSettings` says: ``timeout`` per try (whole body), transient failures retried with
    backoff, bodies over ``max_bytes`` refused unread, relative paths read from ``base``.

    >>> with Fetcher(FetchSettings(workers=2)) as f:          # doctest: +SKIP
    ...     blobs = f.fetch_many(["https://example.com/a.jpg", "s3://bucket/b.jpg"])
    """

    def __init__(self, settings: FetchSettings | None = None, *, base: str | None = None) -> None:
        self.settings = settings or FetchSettings()
        self.base = base
        self._pool = ThreadPoolExecutor(max(1, self.settings.workers), thread_name_prefix="embedkit-fetch")
        self._http: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._http is not None:
            self._http.close()

    def fetch_many(
        self, urls: Sequence[str | None], *, base: str | None = None
    ) -> list[bytes | InvalidImageError]:
        """Bytes (or the error) for each URL, in order; at most ``workers`` fetches at once.
        Relative paths are read from ``base`` (default: the fetcher's own)."""
        return list(self._pool.map(lambda u: self._try_fetch(u, base), urls))

    def _try_fetch(self, url: str | None, base: str | None) -> bytes | InvalidImageError:
        try:
            return self.fetch(url, base=base)
        except InvalidImageError as exc:
            return exc

    def fetch(self, url: str | None, *, base: str | None = None) -> bytes:
        """The bytes at ``url``, with retries; raises :class:`InvalidImageError`."""
        if url is None or not str(url).strip():
            raise InvalidImageError("missing image", "the row has no url")
        url = str(url).strip()
        scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
        if scheme not in self.settings.schemes:
            allowed = ", ".join(f"{s}://" for s in self.settings.schemes)
            raise InvalidImageError(
                "fetch failed", f"{url}: scheme {scheme}:// not allowed (allowed: {allowed})"
            )
        delay = self.settings.backoff
        for attempt in range(self.settings.retries + 1):
            try:
                if scheme in ("http", "https"):
                    return self._http_get(url)
                return self._fs_get(url, base or self.base)
            except _Retry as exc:
                if attempt >= self.settings.retries:
                    tries = f" (after {attempt + 1} tries)" if attempt else ""
                    raise InvalidImageError("fetch failed", f"{url}: {exc}{tries}") from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _client(self) -> Any:
        with self._lock:
            if self._http is None:
                import httpx

                n = max(1, self.settings.workers)
                self._http = httpx.Client(
                    timeout=httpx.Timeout(self.settings.timeout),
                    limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                    follow_redirects=True,
                    headers={"User-Agent": "embedkit (image embedding job)"},
                )
            return self._http

    def _http_get(self, url: str) -> bytes:
        import httpx

        cap = self.settings.max_bytes
        deadline = time.monotonic() + self.settings.timeout
        try:
            with self._client().stream("GET", url) as resp:
                status = resp.status_code
                if status == 429 or status >= 500:
                    raise _Retry(f"HTTP {status}")
                if status >= 400:
                    raise InvalidImageError("fetch failed", f"{url}: HTTP {status}")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > cap:
                    raise InvalidImageError(
                        "oversized image", f"{url}: {declared} bytes, over the limit of {cap}"
                    )
                chunks, size = [], 0
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise InvalidImageError(
                            "oversized image", f"{url}: more than the limit of {cap} bytes"
                        )
                    if time.monotonic() > deadline:
                        raise _Retry(f"timed out after {self.settings.timeout:g}s")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException:
            raise _Retry(f"timed out after {self.settings.timeout:g}s") from None
        except httpx.TransportError as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:  # invalid URL and the like: no point retrying
            raise InvalidImageError("fetch failed", f"{url}: {type(exc).__name__}: {exc}") from None

    def _fs_get(self, url: str, base: str | None) -> bytes:
        target = url
        if "://" not in url and not os.path.isabs(url) and base is not None:
            target = base.rstrip("/") + "/" + url if is_remote(base) else os.path.join(base, url)
        cap = self.settings.max_bytes
        try:
            fs, path = get_fs(target)
            size = fs.size(path)
            if size is not None and size > cap:
                raise InvalidImageError("oversized image", f"{url}: {size} bytes, over the limit of {cap}")
            return fs.cat_file(path)
        except InvalidImageError:
            raise
        except FileNotFoundError:
            raise InvalidImageError("fetch failed", f"{url}: no such file or object") from None
        except PermissionError as exc:
            raise InvalidImageError("fetch failed", f"{url}: permission denied: {exc}") from None
        except (TimeoutError, ConnectionError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:
            raise InvalidImageError("fetch failed", f"{url}: {type(exc).__name__}: {exc}") from None

"""When to retry, how long to wait, and which typed error to raise when not.

One request's attempts share a total deadline. Retried: 429 and 503 (the server is busy or not ready),
502 and 504 (a gateway in between), connection errors and timeouts. Waits grow exponentially with
jitter and are never shorter than the server's ``Retry-After``. Everything else raises at once.

>>> p = RetryPolicy(max_retries=3, deadline=10, backoff=0.5, backoff_max=4)
>>> 0.25 <= p.backoff_delay(1) <= 0.5 and 2.0 <= p.backoff_delay(4) <= 4.0
True
>>> parse_retry_after("3")
3.0
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from embedkit.client.errors import EndpointError, EndpointUnavailableError

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


@dataclass
class WireResponse:
    """What came back from one attempt: status, body and (lower-cased) headers."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    origin: str = "HTTP"  # "HTTP", or the SageMaker error code the status was taken from


class TransportFailure(Exception):
    """No answer at all: connection refused/reset, DNS, or a timeout (``timeout=True``)."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def server_message(body: bytes) -> tuple[str, str | None]:
    """The message and error type in an error body: TEI-like ``{"error", "error_type"}``, the HF
    container's ``{"message", "type"}``, OpenAI's ``{"error": {"message", "type"}}``, or raw text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data: Any = json.loads(text)
    except ValueError:
        return (text[:500] or "(empty body)"), None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err)), err.get("type") or err.get("code")
        msg = err if err is not None else data.get("message", data.get("Message", data.get("detail")))
        kind = data.get("error_type") or data.get("type") or data.get("ErrorCode")
        if msg is not None:
            return str(msg), (str(kind) if kind is not None else None)
    return text[:500], None


@dataclass
class RetryPolicy:
    """Backoff and limits of one request; see the module docstring."""

    max_retries: int = 8
    deadline: float = 120.0
    backoff: float = 0.25
    backoff_max: float = 8.0
    request_timeout: float = 60.0

    def backoff_delay(self, retry: int) -> float:
        """Wait before retry number ``retry`` (1-based): exponential, capped, "equal jitter"."""
        cap = min(self.backoff_max, self.backoff * (2 ** (retry - 1)))
        return cap / 2 + random.uniform(0, cap / 2)

    def start(self, target: str, what: str) -> Attempts:
        return Attempts(self, target, what)


class Attempts:
    """The attempts of one request: call :meth:`timeout` before each, :meth:`failed` after a failure
    (returns the seconds to wait, or raises the typed error when there is nothing left to try)."""

    def __init__(self, policy: RetryPolicy, target: str, what: str) -> None:
        self.policy = policy
        self.target = target
        self.what = what
        self.count = 0
        self.started = time.monotonic()

    def remaining(self) -> float:
        return self.policy.deadline - (time.monotonic() - self.started)

    def timeout(self) -> float:
        """Timeout for the next attempt: the per-attempt timeout, cut to what the deadline leaves."""
        self.count += 1
        return max(0.001, min(self.policy.request_timeout, self.remaining()))

    def failed(self, response: WireResponse | None = None, failure: TransportFailure | None = None) -> float:
        if response is not None:
            message, kind = server_message(response.body)
            status: int | None = response.status
            origin = "" if response.origin == "HTTP" else f" ({response.origin})"
            said = f"answered {status}{origin}: {message}"
            retryable = status in RETRYABLE_STATUS
            retry_after = parse_retry_after(response.headers.get("retry-after"))
        else:
            assert failure is not None
            message, kind, status, retry_after, retryable = str(failure), None, None, None, True
            said = f"gave no answer: {message}"
        where = f"{self.target} {said} (request for {self.what})"
        if not retryable:
            raise EndpointError(
                where, status=status, server_message=message, server_error_type=kind,
                target=self.target, attempts=self.count,
            )  # fmt: skip
        delay = self.policy.backoff_delay(self.count)
        if retry_after is not None:
            delay = max(delay, retry_after)
        left = self.remaining()
        if self.count > self.policy.max_retries or delay >= left:
            why = (
                f"after {self.count} attempts"
                if self.count > self.policy.max_retries
                else f"within the {self.policy.deadline:g}s retry deadline (next wait {delay:.2f}s, "
                f"{max(left, 0):.2f}s left)"
            )
            raise EndpointUnavailableError(
                f"{where}; giving up {why}. Check the endpoint is up and healthy (GET /ping), or raise "
                "EMBEDKIT_RETRY_DEADLINE / EMBEDKIT_MAX_RETRIES",
                status=status, server_message=message, server_error_type=kind,
                target=self.target, attempts=self.count,
            )  # fmt: skip
        return delay

"""The one place where errors become HTTP answers: the Errors table of docs/server.md, case by case.

Container surface bodies are TEI-like ``{"error": ..., "error_type": ...}``; the HF DLC exact mode
uses the official container's ``{"code", "type", "message"}``; the runtime surface wraps them the
way boto3 parses SageMaker runtime errors (see :func:`runtime_error`).

>>> status, body, headers = http_error(PayloadTooLargeError("body over 6291456 bytes"))
>>> status, body["error_type"]
(413, 'PayloadTooLarge')
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson

from embedkit.errors import EmbedkitError, NotReadyError, OverloadedError, PayloadTooLargeError

log = logging.getLogger("embedkit.server")

MODEL_ERROR = "ModelError:http://internal.amazon.com/coral/com.amazon.sagemaker/"
VALIDATION_ERROR = "ValidationError:http://internal.amazon.com/coral/com.amazon.coral.validate/"
THROTTLING = "ThrottlingException:http://internal.amazon.com/coral/com.amazon.coral.availability/"
UNAVAILABLE = "ServiceUnavailable:http://internal.amazon.com/coral/com.amazon.coral.availability/"
ACCESS_DENIED = "AccessDeniedException:http://internal.amazon.com/coral/com.amazon.coral.service/"
LOG_STREAM_ARN = "arn:aws:logs:local:000000000000:log-group:/aws/sagemaker/Endpoints/embedkit"

__all__ = [
    "BodyTooLargeError",
    "HookError",
    "ModelCapabilityError",
    "NotFoundError",
    "UnauthorizedError",
    "http_error",
    "runtime_error",
    "runtime_too_large",
]


class UnauthorizedError(EmbedkitError):
    """The server has an API key and the request did not carry it."""

    http_status = 401
    exit_code = 2
    error_type = "Unauthorized"


class NotFoundError(EmbedkitError):
    """A route or method the server does not have."""

    http_status = 404
    exit_code = 2
    error_type = "NotFound"

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.http_status = status


class ModelCapabilityError(EmbedkitError):
    """The loaded model cannot serve the route: ``POST /embed_sparse`` on a model without BGE-M3's
    sparse head. 424 with ``error_type`` ``Backend``, as TEI answers a route its model lacks."""

    http_status = 424
    exit_code = 2
    error_type = "Backend"


class HookError(EmbedkitError):
    """An exception raised by a hook of the user's ``inference.py`` (``input_fn``, ``predict_fn``,
    ``output_fn``, ``transform_fn``): answered 400 with its message, as the Hugging Face inference
    toolkit does, or with its own ``status_code`` (the inference toolkit's errors carry one).

    >>> err = HookError("input_fn", ValueError("Input must contain 'texts'"))
    >>> (err.http_status, err.error_type, err.message)
    (400, 'ValueError', "Input must contain 'texts'")
    """

    exit_code = 1

    def __init__(self, hook: str, exc: BaseException) -> None:
        status = getattr(exc, "status_code", None)
        valid = isinstance(status, int) and not isinstance(status, bool) and 400 <= status < 600
        self.http_status = status if valid else 400  # type: ignore[assignment]
        self.error_type = type(exc).__name__
        super().__init__(str(getattr(exc, "detail", None) or exc) or type(exc).__name__, hook=hook)


def http_error(exc: BaseException, *, dlc: bool = False) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, body, headers)`` for any exception; unexpected ones are logged, never shown."""
    user_status = getattr(exc, "status_code", None)
    if isinstance(exc, EmbedkitError):
        status, message, error_type = exc.http_status, exc.message, exc.error_type
        if status >= 500 and not isinstance(exc, NotReadyError):
            log.error("request failed: %s", message, exc_info=exc)
    elif isinstance(user_status, int) and 400 <= user_status < 600:
        # errors that carry their own status (the inference toolkit's, starlette's HTTPException)
        status, message, error_type = (
            user_status,
            str(getattr(exc, "detail", None) or exc),
            type(exc).__name__,
        )
    else:
        log.error("unexpected error while answering a request", exc_info=exc)
        status, message, error_type = 500, "internal error; the server log has the details", "Internal"
    headers: dict[str, str] = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if dlc:
        return status, {"code": status, "type": "InternalServerException", "message": message}, headers
    return status, {"error": message, "error_type": error_type}, headers


def runtime_error(status: int, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    """Wrap a container answer ``status >= 400`` as the SageMaker runtime API would for boto3.

    4xx/5xx from the model become 424 ``ModelError`` carrying ``OriginalStatusCode`` and
    ``OriginalMessage``; a full queue stays a retryable 429 ``ThrottlingException`` and a model
    still loading a retryable 503.
    """
    text = body.decode("utf-8", "replace")
    if status == 429:
        out = {"message": _message(text)}
        return 429, orjson.dumps(out), {"x-amzn-ErrorType": THROTTLING, **headers}
    if status == 503:
        return 503, orjson.dumps({"message": _message(text)}), {"x-amzn-ErrorType": UNAVAILABLE}
    if status == 401:
        return 403, orjson.dumps({"message": _message(text)}), {"x-amzn-ErrorType": ACCESS_DENIED}
    kind = "client" if status < 500 else "server"
    out = {
        "ErrorCode": "CLIENT_ERROR_FROM_MODEL" if status < 500 else "INTERNAL_FAILURE_FROM_MODEL",
        "Message": f'Received {kind} error ({status}) from primary with message "{text}". '
        f"See {LOG_STREAM_ARN} in account 000000000000 for more information.",
        "OriginalMessage": text,
        "OriginalStatusCode": status,
        "LogStreamArn": LOG_STREAM_ARN,
    }
    return 424, orjson.dumps(out), {"x-amzn-ErrorType": MODEL_ERROR}


def runtime_too_large(limit: int) -> tuple[int, bytes, dict[str, str]]:
    """The runtime API's own 413 for a body over the limit, before any model sees it, in the real
    SageMaker runtime's wording (``HTTP content length exceeded 6291456 bytes.``)."""
    return 413, orjson.dumps({"message": f"HTTP content length exceeded {limit} bytes."}), {}


def validation_error(message: str) -> tuple[int, bytes, dict[str, str]]:
    """The runtime API's 400 for a request it refuses before reaching the model."""
    return 400, orjson.dumps({"message": message}), {"x-amzn-ErrorType": VALIDATION_ERROR}


class BodyTooLargeError(PayloadTooLargeError):
    """The request body itself is over ``max_body_bytes`` (the runtime surface answers this one
    itself, as the SageMaker runtime does, instead of as a model error)."""


def body_too_large(limit: int) -> BodyTooLargeError:
    return BodyTooLargeError(
        f"request body is larger than {limit} bytes (max_body_bytes); send fewer or shorter inputs per request"
    )


def _message(text: str) -> str:
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or text)
    return text

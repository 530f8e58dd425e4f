"""Typed errors of the client, all under :class:`embedkit.errors.EmbedkitError`.

Each carries what the server said (``status``, ``server_message``, ``server_error_type``) and where the
request went, so callers can branch on them without parsing strings:

>>> err = EndpointError("bad", status=400, server_message="inputs[0] is empty")
>>> (err.status, err.server_message, err.exit_code)
(400, 'inputs[0] is empty', 1)
"""

from __future__ import annotations

from typing import Any

from embedkit.errors import EmbedkitError


class EndpointError(EmbedkitError):
    """The endpoint answered with an error that retrying would not fix (a 4xx, a 500, ...).

    ``status`` is the HTTP status of the model's own answer: for SageMaker's ``ModelError`` it is the
    container's ``OriginalStatusCode``, and ``server_message`` its ``OriginalMessage`` (decoded when it
    is a JSON error body)."""

    http_status = 502
    exit_code = 1
    error_type = "Endpoint"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        server_message: str | None = None,
        server_error_type: str | None = None,
        target: str | None = None,
        attempts: int = 1,
        **context: Any,
    ) -> None:
        super().__init__(message, status=status, target=target, **context)
        self.status = status
        self.server_message = server_message
        self.server_error_type = server_error_type
        self.target = target
        self.attempts = attempts


class EndpointUnavailableError(EndpointError):
    """Retries ran out (count or deadline) on 429/502/503/504, connection errors or timeouts.

    ``status`` is the last status seen, or None when the last attempt got no answer at all."""

    http_status = 503
    exit_code = 69  # EX_UNAVAILABLE
    error_type = "EndpointUnavailable"


class ResponseFormatError(EndpointError):
    """The endpoint answered 200 with a body the chosen contract cannot read (wrong shape or count)."""

    error_type = "EndpointResponse"

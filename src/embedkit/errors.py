"""One exception tree for everything embedkit raises on purpose.

Each error knows the HTTP status a server answers with and the exit code a CLI exits with, so doors
(server, batch job, CLI) map errors in one place instead of guessing.

>>> from embedkit.errors import InputError
>>> err = InputError("inputs[3] is empty", field="inputs", index=3)
>>> (err.http_status, err.exit_code, err.error_type)
(400, 2, 'Validation')
"""

from __future__ import annotations

from typing import Any


class EmbedkitError(Exception):
    """Root of every error embedkit raises deliberately."""

    http_status: int = 500
    exit_code: int = 1
    error_type: str = "Internal"

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = {k: v for k, v in context.items() if v is not None}

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """The TEI-like error body: ``{"error": ..., "error_type": ...}``."""
        return {"error": self.message, "error_type": self.error_type}


class ConfigError(EmbedkitError):
    """A setting, flag or option that cannot work (wrong value, impossible combination)."""

    http_status = 400
    exit_code = 2
    error_type = "Config"


class InputError(EmbedkitError):
    """Bad input from the caller: wrong type, empty text, unknown field. Names the field/index."""

    http_status = 400
    exit_code = 2
    error_type = "Validation"


class InputTooLongError(InputError):
    """An input is longer than the model's maximum and truncation is off."""


class InvalidImageError(InputError):
    """An image that cannot be embedded. ``kind`` is what a batch job counts in its rejects:
    ``missing image``, ``not an image``, ``truncated image``, ``undecodable image``,
    ``image too large``, ``oversized image``, ``fetch failed``."""

    def __init__(self, kind: str, detail: str, **context: Any) -> None:
        super().__init__(f"{kind}: {detail}", **context)
        self.kind = kind
        self.detail = detail

    @property
    def reason(self) -> str:
        """``"<kind>: <detail>"``, the text a batch job writes in its rejects."""
        return f"{self.kind}: {self.detail}"

    def at(self, field: str, index: int) -> InvalidImageError:
        """The same error naming where it happened: ``images[3]: truncated image: ...``."""
        err = InvalidImageError(self.kind, self.detail, field=field, index=index)
        err.message = f"{field}[{index}]: {self.reason}"
        return err


class PayloadTooLargeError(EmbedkitError):
    """A request body or input count over the configured limit."""

    http_status = 413
    exit_code = 2
    error_type = "PayloadTooLarge"


class UnsupportedMediaTypeError(EmbedkitError):
    http_status = 415
    exit_code = 2
    error_type = "UnsupportedMediaType"


class NotAcceptableError(EmbedkitError):
    http_status = 406
    exit_code = 2
    error_type = "NotAcceptable"


class OverloadedError(EmbedkitError):
    """The queue is full; the caller should retry after ``retry_after`` seconds."""

    http_status = 429
    exit_code = 75  # EX_TEMPFAIL
    error_type = "Overloaded"

    def __init__(self, message: str, retry_after: float = 1.0, **context: Any) -> None:
        super().__init__(message, **context)
        self.retry_after = retry_after


class NotReadyError(EmbedkitError):
    """The model is not loaded yet, or the inference worker is dead."""

    http_status = 503
    exit_code = 69  # EX_UNAVAILABLE
    error_type = "Unhealthy"


class ModelNotFoundError(EmbedkitError):
    """A model spec that resolves to nothing on this machine (no downloads happen at run time)."""

    http_status = 400
    exit_code = 2
    error_type = "ModelNotFound"


class ModelLoadError(EmbedkitError):
    """A model directory exists but cannot be loaded (missing files, unsupported module)."""

    http_status = 500
    exit_code = 3
    error_type = "ModelLoad"


class DeviceError(EmbedkitError):
    """A device or precision this machine cannot provide (fp16 on CPU, CUDA absent, ...)."""

    http_status = 400
    exit_code = 2
    error_type = "Device"


class OutOfMemoryError(EmbedkitError):
    """A single input does not fit in memory even alone."""

    http_status = 500
    exit_code = 4
    error_type = "OutOfMemory"


class StorageError(EmbedkitError):
    """Reading or writing local/S3 storage failed."""

    http_status = 500
    exit_code = 5
    error_type = "Storage"


class JobStateError(EmbedkitError):
    """The output already holds a job made with other settings; refusing to mix vectors."""

    http_status = 409
    exit_code = 6
    error_type = "JobState"


class InterruptedJobError(EmbedkitError):
    """The batch job stopped on SIGTERM/SIGINT after saving its state; rerun to resume."""

    http_status = 503
    exit_code = 130
    error_type = "Interrupted"

"""Client configuration: which endpoint, which wire contract, how to split and retry.

The transport is chosen from configuration only: ``EMBEDKIT_ENDPOINT_URL`` (any server speaking the
contract over HTTP) or ``EMBEDKIT_SAGEMAKER_ENDPOINT`` (a SageMaker endpoint name, reached with boto3's
``sagemaker-runtime`` client and the usual AWS credential chain). Exactly one of the two must be set.

>>> s = ClientSettings.from_env({"EMBEDKIT_ENDPOINT_URL": "http://localhost:8080"})
>>> (s.transport, s.contract)
('http', 'hf')
"""

from __future__ import annotations

from dataclasses import dataclass

from embedkit.errors import ConfigError
from embedkit.settings import Settings, setting

CONTRACTS = ("hf", "search_term", "openai", "tei")
TOKEN_POOLING = ("mean", "cls")
# SageMaker's real-time payload limit is 6 MiB and the serverless one 4 MB; stay under both.
DEFAULT_MAX_PAYLOAD_BYTES = 3_500_000


@dataclass
class ClientSettings(Settings):
    """Where the embedding endpoint is and how the client talks to it (env ``EMBEDKIT_*``)."""

    endpoint_url: str | None = setting(
        None,
        "HTTP endpoint: a base URL (http://host:8080 -> /invocations, /v1/embeddings for openai, /embed "
        "for tei) "
        "or a full URL ending in the path to POST to",
    )
    sagemaker_endpoint: str | None = setting(None, "SageMaker endpoint name, called through boto3")
    region: str | None = setting(
        None,
        "AWS region of the SageMaker endpoint",
        env=("AWS_REGION", "AWS_DEFAULT_REGION", "SAGEMAKER_REGION"),
    )
    sagemaker_endpoint_url: str | None = setting(
        None,
        "URL of the sagemaker-runtime API (a local stand-in such as `embedkit serve`); unset = AWS",
        env=("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME",),
    )
    contract: str = setting(
        "hf",
        "wire contract: hf ({inputs}->{embeddings}), search_term, openai, tei (text-embeddings-inference /embed)",
    )
    search_term_batch: bool = setting(
        False, "send lists as {search_term: [...]} (embedkit serve accepts them); else one text a request"
    )
    openai_model: str = setting("default", "the `model` field of openai requests")
    token_pooling: str = setting(
        "mean", "pooling for token-level answers (the HF container's feature-extraction): mean or cls"
    )
    api_key: str | None = setting(None, "bearer token sent as Authorization (HTTP only)", secret=True)
    max_batch: int = setting(32, "most texts in one request (the server's max inputs per request)")
    max_payload_bytes: int = setting(
        DEFAULT_MAX_PAYLOAD_BYTES,
        "largest request body in bytes (SageMaker: 6 MiB real-time, 4 MB serverless)",
    )
    request_timeout: float = setting(60.0, "seconds one attempt may take (SageMaker allows 60)")
    retry_deadline: float = setting(120.0, "seconds one request may spend across all its attempts")
    max_retries: int = setting(8, "retries of one request on 429/502/503/504, connection errors, timeouts")
    retry_backoff: float = setting(0.25, "first backoff in seconds; doubles each retry, with jitter")
    retry_backoff_max: float = setting(8.0, "longest backoff between two attempts, in seconds")
    concurrency: int = setting(4, "requests in flight at once when a call is split into several")

    @property
    def transport(self) -> str:
        """``http`` or ``sagemaker``, after :meth:`validate`."""
        return "sagemaker" if self.sagemaker_endpoint else "http"

    def validate(self) -> ClientSettings:
        """Raise :class:`ConfigError` for settings that cannot work; return self."""
        if self.endpoint_url and self.sagemaker_endpoint:
            raise ConfigError(
                "Set either EMBEDKIT_ENDPOINT_URL (--endpoint-url) or EMBEDKIT_SAGEMAKER_ENDPOINT "
                f"(--sagemaker-endpoint), not both (got {self.endpoint_url!r} and {self.sagemaker_endpoint!r})"
            )
        if not self.endpoint_url and not self.sagemaker_endpoint:
            raise ConfigError(
                "No endpoint configured: set EMBEDKIT_ENDPOINT_URL=http://host:8080 for a local or HTTP "
                "server, or EMBEDKIT_SAGEMAKER_ENDPOINT=<name> (+ AWS_REGION) for a SageMaker endpoint"
            )
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint_url must start with http:// or https://, got {self.endpoint_url!r}")
        if self.contract not in CONTRACTS:
            raise ConfigError(f"contract must be one of {', '.join(CONTRACTS)}, got {self.contract!r}")
        if self.contract == "openai" and self.sagemaker_endpoint:
            raise ConfigError(
                "contract 'openai' needs EMBEDKIT_ENDPOINT_URL (a /v1/embeddings server); "
                "SageMaker endpoints take contract hf or search_term"
            )
        if self.token_pooling not in TOKEN_POOLING:
            raise ConfigError(
                f"token_pooling must be one of {', '.join(TOKEN_POOLING)}, got {self.token_pooling!r}"
            )
        for name in ("max_batch", "max_payload_bytes", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("request_timeout", "retry_deadline", "retry_backoff_max"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        if self.max_retries < 0 or self.retry_backoff < 0:
            raise ConfigError("max_retries and retry_backoff must not be negative")
        return self

    def target(self) -> str:
        """A human description of where requests go (for logs and errors)."""
        if self.sagemaker_endpoint:
            where = self.sagemaker_endpoint_url or f"AWS {self.region or '(default region)'}"
            return f"SageMaker endpoint {self.sagemaker_endpoint!r} at {where}"
        return str(self.endpoint_url)

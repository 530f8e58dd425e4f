"""Settings of ``embedkit serve``: where to listen, limits, batching, auth and custom handlers.

Every field has an ``EMBEDKIT_*`` environment name and a flag, generated from its declaration; the
SageMaker names are read too (``SAGEMAKER_BIND_TO_PORT``, ``SAGEMAKER_PROGRAM``,
``SAGEMAKER_SUBMIT_DIRECTORY``). Precedence, as everywhere: flag > environment > default.

>>> s = ServerSettings.from_env({"SAGEMAKER_BIND_TO_PORT": "9000"})
>>> (s.host, s.port, s.max_body_bytes)
('127.0.0.1', 9000, 6291456)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from embedkit.errors import ConfigError
from embedkit.settings import Settings, setting

HF_MODES = ("embeddings", "tei", "dlc-exact")
SAGEMAKER_MODEL_DIR = "/opt/ml/model"


@dataclass
class ServerSettings(Settings):
    """How the server listens and protects itself; the engine fields live in EngineSettings."""

    host: str = setting("127.0.0.1", "address to bind (the container image binds 0.0.0.0)")
    port: int = setting(8080, "port to listen on", env=("SAGEMAKER_BIND_TO_PORT",))
    endpoint_name: str = setting(
        "*", "endpoint name(s) the runtime surface answers, comma-separated; * = any name"
    )
    max_body_bytes: int = setting(6 * 1024 * 1024, "largest request body in bytes (413 above it)")
    max_client_batch_size: int = setting(512, "most inputs in one request (413 above it)")
    max_response_bytes: int = setting(
        64 * 1024 * 1024,
        "largest answer carrying lexical weights or ColBERT vectors, in bytes (413 above it, naming "
        "the size); dense-only answers are not checked. SageMaker: 6291456 real-time, 4000000 serverless",
    )
    max_queue_tokens: int = setting(
        0, "tokens waiting before new requests get 429; 0 = automatic (max(262144, batch size x max length))"
    )
    batch_wait_ms: float = setting(
        2.0,
        "longest a forming batch waits for more requests, in milliseconds, when the previous batch "
        "merged several and only until as many are in (a lone request never waits); 0 = never wait",
    )
    hf_mode: str = setting(
        "embeddings",
        "what {'inputs'} on /invocations returns: embeddings ({'embeddings': ...}), tei (a bare list of "
        "vectors, as the TEI SageMaker container) or dlc-exact (token-level, as the HF DLC)",
        choices=HF_MODES,
    )
    api_key: str | None = setting(None, "bearer token required on every route but /ping", secret=True)
    program: str | None = setting(
        None, "custom handler module file (e.g. inference.py)", env=("SAGEMAKER_PROGRAM",)
    )
    submit_directory: str | None = setting(
        None,
        "directory holding the custom handler; default <model dir>/code",
        env=("SAGEMAKER_SUBMIT_DIRECTORY",),
    )
    allow_image_urls: bool = setting(
        False,
        'CLIP models: let /invocations fetch {"inputs": {"url": ...}}; a risk: any caller can then make '
        "the server reach any address it can (internal services, cloud metadata); trusted callers only",
    )
    threads: int = setting(0, "torch intra-op threads for the inference worker; 0 = torch's default")
    graceful_timeout: float = setting(25.0, "seconds to finish in-flight requests after SIGTERM")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be between 1 and 65535, got {self.port}")
        for name in ("max_body_bytes", "max_client_batch_size", "max_response_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue_tokens < 0 or self.batch_wait_ms < 0 or self.threads < 0:
            raise ConfigError("max_queue_tokens, batch_wait_ms and threads must not be negative")

    @property
    def endpoint_names(self) -> frozenset[str] | None:
        """The names the runtime surface accepts; ``None`` means any."""
        names = {n.strip() for n in self.endpoint_name.split(",") if n.strip()}
        return None if not names or "*" in names else frozenset(names)


def sagemaker_model_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """``SM_MODEL_DIR`` (default ``/opt/ml/model``) when it exists and holds something."""
    environ = os.environ if environ is None else environ
    path = Path(environ.get("SM_MODEL_DIR") or SAGEMAKER_MODEL_DIR)
    try:
        return path if path.is_dir() and any(path.iterdir()) else None
    except OSError:
        return None


def _holds_model(path: Path) -> bool:
    return any((path / name).exists() for name in ("modules.json", "config.json", "model.tar.gz"))


def _is_location(spec: str) -> bool:
    """True for a spec naming a place (a local path or ``s3://``), not the default model or a hub id."""
    return spec.startswith(("s3://", "s3a://")) or Path(spec).expanduser().exists()


def choose_model(
    flag_or_env: str | None, environ: Mapping[str, str] | None = None
) -> tuple[str, Path | None]:
    """Pick the model spec and the SageMaker model dir (where ``code/inference.py`` may live).

    Precedence: ``--model`` / ``EMBEDKIT_MODEL`` / ``HF_MODEL_ID``, then ``/opt/ml/model`` (or
    ``SM_MODEL_DIR``) when it holds a model, then the default model. A spec that names a directory
    or a ``model.tar.gz`` (local or ``s3://``) is its own model dir: the returned dir is ``None`` and
    the server finds ``code/`` in it (unpacking an archive first) as it loads, exactly as SageMaker
    unpacks ``model.tar.gz`` into ``/opt/ml/model``. The default model and hub ids keep
    ``/opt/ml/model`` for ``code/`` (``HF_MODEL_ID`` beside a handler, as the Hugging Face DLC does).
    """
    model_dir = sagemaker_model_dir(environ)
    if flag_or_env:
        return flag_or_env, None if _is_location(flag_or_env) else model_dir
    if model_dir is not None and _holds_model(model_dir):
        tarball = model_dir / "model.tar.gz"
        spec = tarball if tarball.exists() and not (model_dir / "config.json").exists() else model_dir
        return str(spec), model_dir
    return "default", model_dir

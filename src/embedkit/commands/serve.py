"""``embedkit serve``: the SageMaker-compatible embedding server (what the image runs on ``serve``)."""

from __future__ import annotations

import argparse
import json
import logging
import os

from embedkit.errors import EmbedkitError, ModelLoadError
from embedkit.settings import EngineSettings

log = logging.getLogger("embedkit.server")


class _Server:
    """uvicorn's server, minus re-raising SIGTERM after the graceful shutdown (SageMaker wants exit 0)."""

    def __new__(cls, config):
        import signal

        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                super().handle_exit(sig, frame)
                if sig == signal.SIGTERM:
                    self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

        return Server(config)


def register(sub: argparse._SubParsersAction) -> None:
    from embedkit.server.settings import ServerSettings

    p = sub.add_parser(
        "serve",
        help="serve embeddings over HTTP: SageMaker /ping + /invocations, boto3 runtime, TEI /embed, OpenAI",
        description="Serve embeddings over HTTP. The model comes from --model, HF_MODEL_ID, or "
        "/opt/ml/model (SM_MODEL_DIR) when it holds one, else the default model.",
    )
    EngineSettings.add_arguments(p)
    ServerSettings.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    # OMP_WAIT_POLICY=PASSIVE is set by importing embedkit (before torch loads): the server hands
    # work between threads many times a second, and spinning OpenMP workers would starve them.
    from embedkit.server import ServerSettings, choose_model, create_app

    environ = os.environ
    engine = EngineSettings.from_args(args)
    explicit = engine.model if engine.source("model") != "default" else None  # flag or env
    engine.model, model_dir = choose_model(explicit, environ)
    server = ServerSettings.from_args(args)
    level = environ.get("SAGEMAKER_CONTAINER_LOG_LEVEL")
    if level and "EMBEDKIT_LOG_LEVEL" not in environ and level.strip().isdigit():
        logging.getLogger().setLevel(int(level))
    if environ.get("SAGEMAKER_MODEL_SERVER_WORKERS"):
        log.info("SAGEMAKER_MODEL_SERVER_WORKERS ignored: one process batches all requests on one model")
    log.info(
        "embedkit serve on http://%s:%d (model dir %s)\nengine: %s\nserver: %s",
        server.host,
        server.port,
        model_dir or "none",
        json.dumps(engine.to_dict(), default=str),
        json.dumps(server.to_dict(), default=str),
    )
    failure: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        failure.append(exc)
        userver.should_exit = True

    app = create_app(engine, server, model_dir=model_dir, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # nothing reads the client's address; one ASGI layer less per request
        log_config=None,
        timeout_graceful_shutdown=int(server.graceful_timeout),
        timeout_keep_alive=75,
    )
    userver = _Server(config)
    userver.run()
    if failure:
        exc = failure[0]
        if isinstance(exc, EmbedkitError):
            raise exc
        raise ModelLoadError(f"the model could not be loaded: {type(exc).__name__}: {exc}") from exc
    if not userver.started:
        return 1  # e.g. the port was taken; uvicorn logged why
    return 0

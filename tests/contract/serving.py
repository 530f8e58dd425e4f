"""Run ``python -m embedkit serve`` in a subprocess on a random loopback port, for tests.

>>> with ServerProcess(["--model", str(tiny_model)]) as srv:  # doctest: +SKIP
...     httpx.post(srv.url + "/invocations", json={"inputs": "hi"})
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """``embedkit serve`` with ``args``; ``start(wait_ready=True)`` polls ``/ping`` with a deadline."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, log_dir: Path | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        base = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
        self.env = {**os.environ, **base, **(env or {})}  # PASSIVE: what serve would re-exec with
        for name in ("EMBEDKIT_API_KEY", "EMBEDKIT_ENDPOINT_NAME", "SAGEMAKER_PROGRAM", "SM_MODEL_DIR"):
            if env is None or name not in env:
                self.env.pop(name, None)
        self.env.setdefault("SM_MODEL_DIR", str(ROOT / "no-such-model-dir"))
        self.log_path = (
            log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
        ) / f"embedkit-serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *, wait_ready: bool = True, timeout: float = 90.0) -> ServerProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "embedkit", "serve", "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        if wait_ready:
            self.wait_status("/ping", 200, timeout)
        return self

    def wait_status(self, path: str, status: int, timeout: float = 90.0) -> None:
        """Poll ``path`` until it answers ``status``; fail with the server log on timeout or exit."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                last = httpx.get(self.url + path, timeout=2).status_code
                if last == status:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{path} did not answer {status} within {timeout}s (last {last}):\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def terminate(self, timeout: float = 40.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_runtime_client(url: str, api_key: str | None = None):
    """boto3 ``sagemaker-runtime`` pointed at a local embedkit server (dummy credentials, no
    retries); with ``api_key`` every InvokeEndpoint call carries it as ``X-Api-Key``."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "sagemaker-runtime",
        region_name="us-east-1",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1}),
    )
    if api_key is not None:

        def add_key(request, **_):
            request.headers["X-Api-Key"] = api_key

        client.meta.events.register("before-send.sagemaker-runtime.InvokeEndpoint", add_key)
    return client

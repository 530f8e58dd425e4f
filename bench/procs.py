"""Start :mod:`bench.worker` processes and talk to them in JSON lines, with deadlines."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


class WorkerError(RuntimeError):
    """A worker died, timed out or reported an error; the message carries its stderr tail."""


class Worker:
    """One ``python -m bench.worker MODE ...`` child.

    >>> w = Worker("calibrate", ["--corpus", "c.json"], log_dir=Path("/tmp"))  # doctest: +SKIP
    >>> w.recv(timeout=120)  # doctest: +SKIP
    """

    def __init__(
        self,
        mode: str,
        args: list[str],
        *,
        log_dir: Path,
        name: str | None = None,
        env: dict[str, str | None] | None = None,
    ) -> None:
        self.name = name or mode
        self.log_path = log_dir / f"{self.name}.log"
        overrides = env or {}
        env = {k: v for k, v in os.environ.items() if k not in overrides}
        env.update({k: v for k, v in overrides.items() if v is not None})
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", mode, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=root,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"bench-{self.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise WorkerError(f"worker {self.name} has exited:\n{self.stderr_tail()}") from exc

    def recv(self, timeout: float) -> dict[str, Any]:
        """The next message; raises :class:`WorkerError` on exit, timeout or ``ok: false`` with error."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise WorkerError(
                    f"worker {self.name} gave no answer in {timeout:.0f}s:\n{self.stderr_tail()}"
                )
            try:
                line = self._lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=30)
                raise WorkerError(
                    f"worker {self.name} exited with code {self.proc.returncode}:\n{self.stderr_tail()}"
                )
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue  # not ours
            if not msg.get("ok") and "error" in msg:
                raise WorkerError(f"worker {self.name}: {msg['error']}\n{self.stderr_tail()}")
            return msg

    def close(self, timeout: float = 60) -> None:
        """Ask it to quit (``quit`` line, then end of input) and wait; kill if it does not."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def run_once(
    mode: str,
    args: list[str],
    *,
    log_dir: Path,
    timeout: float,
    name: str | None = None,
    env: dict[str, str | None] | None = None,
) -> dict:
    """Start a one-shot worker, return its single answer."""
    w = Worker(mode, args, log_dir=log_dir, name=name, env=env)
    try:
        return w.recv(timeout)
    except BaseException:
        w.kill()  # interrupted or failed: do not leave it running
        raise
    finally:
        w.close()

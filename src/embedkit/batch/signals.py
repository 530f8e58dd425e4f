"""Thread and signal plumbing of the batch job: the reader / writer threads and the stop flag.

The first SIGTERM / SIGINT sets the job's stop flag (the runners check it between chunks and units,
finish the unit being written and save the state); a second one exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Any

log = logging.getLogger("embedkit.batch")

STOP_GRACE_SECONDS = 15.0  # after a signal, how long the writer may take to finish its unit


class Background:
    """One daemon thread running submitted calls in order (daemon: a stuck read never blocks exit)."""

    def __init__(self, name: str) -> None:
        self._q: SimpleQueue = SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn, *args) -> Future:
        """Queue ``fn(*args)``; its future holds the result or the exception."""
        fut: Future = Future()
        self._q.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

    def close(self) -> None:
        """End the thread once the calls already queued have run."""
        self._q.put(None)


class StopSignals:
    """Within ``with``: SIGTERM/SIGINT set ``stop`` (first time, noting ``at``) or exit at once
    (second time). Handlers are installed only on the main thread, and restored on exit."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.at: float | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.stop.is_set():
            os.write(2, b"embedkit: second signal, exiting now; unrecorded units will be redone on rerun\n")
            os._exit(130)
        self.at = time.monotonic()
        self.stop.set()
        log.warning(
            "received %s: finishing the unit being written, saving state (signal again to exit now)",
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

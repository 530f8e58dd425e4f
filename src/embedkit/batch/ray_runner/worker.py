"""The actors' side of the Ray engine: the engine each actor builds (and the driver's stand-in for
it), and the actor that runs units with the local engine's own code."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from embedkit import errors
from embedkit.batch.metadata import model_fingerprint
from embedkit.batch.pipeline import TextModality, UnitPipeline
from embedkit.batch.plan import Plan, Unit
from embedkit.batch.settings import HostPlan, JobSettings
from embedkit.engine.backend import EVERY_BATCH
from embedkit.errors import ConfigError, EmbedkitError
from embedkit.settings import EngineSettings

log = logging.getLogger("embedkit.batch")

INSTALL_HINT = "pip install 'embedkit[ray]'"


def require_ray() -> None:
    """Fail with an install hint when Ray is missing (the runner uses Ray Core only: importing Ray
    Data would cost the driver a second of start-up for nothing)."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--engine ray needs Ray, which is not installed ({exc}): {INSTALL_HINT}") from None


class _WorkersEngine:
    """The driver's stand-in for the workers' engine when they run on GPUs: the model loaded on the
    driver's CPU (for its hash, dimension, pooling...), reporting the workers' device and precision
    (a Ray head node often has no GPU, and the driver must not take the workers' GPU memory)."""

    def __init__(self, embedder: Any, precision: str, device: str) -> None:
        self._e = embedder
        self.precision = precision
        self.device = device
        self.devices = [device]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._e, name)

    def describe(self) -> dict[str, Any]:
        return {**self._e.describe(), "device": self.device, "precision": self.precision, "threads": None}


def worker_device(settings: JobSettings) -> str:
    """The device the actors run on: a GPU where they reserve one, else the CPU."""
    device = (settings.device or "auto").strip().lower()
    gpus = settings.gpus_per_worker or 0
    if device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if device.startswith("cuda") and gpus <= 0:
        raise ConfigError(f"--device {device} with --engine ray needs --gpus-per-worker (e.g. 1)")
    return device


def driver_embedder(settings: JobSettings) -> Any:
    """The engine the driver fingerprints the job with, loaded on the driver's CPU."""
    from embedkit.engine import build_embedder
    from embedkit.engine.device import PRECISION_ALIASES

    require_ray()
    device = worker_device(settings)
    if device == "cpu":
        return build_embedder(dataclasses.replace(settings, device="cpu"))
    precision = PRECISION_ALIASES.get((settings.precision or "fp32").strip().lower())
    if precision is None:
        raise ConfigError(f"precision {settings.precision!r} is not one of fp32, bf16, fp16, int8")
    cpu_engine = build_embedder(dataclasses.replace(settings, device="cpu", precision="fp32"))
    return _WorkersEngine(cpu_engine, precision, device)


def worker_backend(embedder: Any, device: str) -> str:
    """The backend an actor runs: the driver's, with ``auto`` resolved where the driver's kept
    measurement leaves one runtime (ONNX Runtime alone for every batch, or torch), so such an
    actor neither measures again nor routes batches differently. A plan that splits batches
    between runtimes stays ``auto``, and an actor with another thread count measures its own."""
    backend = getattr(embedder, "backend", None) or "auto"
    if backend != "auto" or device != "cpu" or getattr(embedder, "pending_graph", None) is not None:
        return backend
    limit = int(getattr(embedder, "onnx_max_tokens", 0) or 0)
    if getattr(embedder, "graph_path", None) is None or limit <= 0:
        return "torch"  # no graph here, or torch won every probed shape
    crossover = getattr(embedder, "crossover", None)
    if limit >= EVERY_BATCH and getattr(crossover, "max_ort_tokens", None) is None:
        return "onnx"
    return "auto"


def worker_engine_settings(embedder: Any, device: str) -> dict[str, Any]:
    """EngineSettings fields that rebuild ``embedder`` (the driver's) inside an actor."""
    return {
        "model": embedder.spec,
        "device": device,
        "precision": embedder.precision,
        "backend": worker_backend(embedder, device),
        "max_batch_tokens": 0 if embedder.auto_budget else int(embedder.max_batch_tokens),
        "batch_size": embedder.max_batch_size or 0,
        "normalize": embedder.normalize,
        "dimensions": embedder.dimensions,
        "truncate": embedder.truncate,
        "pooling": embedder.model.pooling,
        "prompt_name": embedder.prompt_name,
        "cpu_fusion": embedder.cpu_fusion,
        "unpad": embedder.unpad,
    }


@dataclass
class WorkerJob:
    """Everything an actor needs, shipped once per actor."""

    settings: JobSettings
    engine: dict[str, Any]
    plan: Plan
    state: Any  # JobState
    folder: Any  # OutputFolder
    hosts: HostPlan
    todo: list[Unit]
    fingerprint: dict[str, Any]
    threads: int
    version: str


def _error_record(exc: BaseException, worker: str, unit: Unit | None = None) -> dict[str, Any]:
    return {
        "ok": False,
        "type": type(exc).__name__,
        "message": str(exc),
        "worker": worker,
        "unit": None if unit is None else f"{unit.source} rows {unit.start}..{unit.stop or 'end'}",
        "traceback": None if isinstance(exc, EmbedkitError) else traceback.format_exc(),
    }


def rebuild_error(rec: dict[str, Any]) -> EmbedkitError:
    """The embedkit error an actor returned as a record (see :class:`UnitWorker`), to raise again."""
    cls = getattr(errors, rec["type"], None)
    if isinstance(cls, type) and issubclass(cls, EmbedkitError):
        return cls(rec["message"])
    if rec.get("traceback"):
        log.error("ray worker %s failed on %s:\n%s", rec["worker"], rec["unit"], rec["traceback"])
    return EmbedkitError(
        f"ray worker {rec['worker']} failed on {rec['unit']}: {rec['type']}: {rec['message']}"
    )


class UnitWorker:
    """A Ray actor: loads the model once, then prepares, embeds, writes and records units, reading
    the next one (``prefetch``) ahead. Errors travel back as records the driver raises again, so the
    user sees embedkit's own message."""

    def __init__(self, job: WorkerJob) -> None:
        t0 = time.perf_counter()
        self.job = job
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.error: dict[str, Any] | None = None
        self.first = True
        self._reader: ThreadPoolExecutor | None = None
        self._prefetched: dict[int, Future] = {}
        try:
            self.pipeline = self._open(job)
        except Exception as exc:
            self.error = _error_record(exc, self.id)
        self.load_seconds = time.perf_counter() - t0
        self.ready_at = time.time()  # wall clock: the driver compares actors (on other nodes too)

    @staticmethod
    def _open(job: WorkerJob) -> UnitPipeline:
        # Ray sets OMP_NUM_THREADS to the whole CPUs an actor reserves (1 for 1.5 CPUs); the
        # engine runs job.threads (what the reservation rounds to), torch and ONNX Runtime alike.
        os.environ["OMP_NUM_THREADS"] = str(job.threads)
        import torch

        from embedkit import __version__
        from embedkit.engine import build_embedder

        torch.set_num_threads(job.threads)
        if __version__ != job.version:
            raise ConfigError(
                f"Ray worker {socket.gethostname()} runs embedkit {__version__}, the driver {job.version}: "
                f"install the same version on every node"
            )
        embedder = build_embedder(EngineSettings(**job.engine))
        got = model_fingerprint(embedder)
        diff = {k: (job.fingerprint.get(k), v) for k, v in got.items() if job.fingerprint.get(k) != v}
        if diff:
            raise ConfigError(
                f"the engine on Ray worker {socket.gethostname()} differs from the driver's "
                f"({'; '.join(f'{k}: {a!r} vs {b!r}' for k, (a, b) in diff.items())}): every node must "
                f"see the same model files and support the same precision"
            )
        # texts only (the Ray engine runs no image job); the driver shows the progress, and the
        # actor's stop flag is never set (Ray ends the actors instead)
        return UnitPipeline(
            job.settings, embedder, job.plan, job.state, job.folder, job.hosts, TextModality()
        )

    def ready(self) -> bool:
        """Answers once the actor is constructed (the model loaded, or its error kept for run_unit)."""
        return True

    def run_unit(self, k: int, prefetch: int | None = None) -> str:
        """Unit ``todo[k]``: its result record, as JSON (a marker, or an error record)."""
        if self.error is not None:
            return json.dumps(self.error)
        unit = self.job.todo[k]
        pipeline = self.pipeline
        before = pipeline.embed_seconds
        try:
            pending = self._prefetched.pop(k, None)
            prepared = pending.result() if pending is not None else pipeline.prepare(unit)
            if prefetch is not None and prefetch not in self._prefetched:
                if self._reader is None:
                    self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedkit-read")
                self._prefetched[prefetch] = self._reader.submit(pipeline.prepare, self.job.todo[prefetch])
            pipeline.check(prepared)
            outputs = pipeline.embed(prepared)
            if outputs is None:  # never here: an actor's stop flag stays clear
                raise EmbedkitError("the unit was abandoned")
            marker = pipeline.write(prepared, outputs)  # part + rejects durable, then the marker
        except Exception as exc:
            return json.dumps(_error_record(exc, self.id, unit))
        out = {
            "ok": True,
            "marker": marker,
            "worker": self.id,
            "node": socket.gethostname(),
            "embed_seconds": pipeline.embed_seconds - before,
            "load_seconds": round(self.load_seconds, 3),
            "ready_at": self.ready_at,
            "done_at": time.time(),
        }
        if self.first:
            self.first = False
            out["engine"] = pipeline.embedder.describe()
        return json.dumps(out, default=str)

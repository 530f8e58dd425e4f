"""Run the batch job on Ray Data: ``embedkit embed IN OUT --engine ray``.

The driver plans the job and checks its state exactly as the local engine does
(:func:`embedkit.batch.embed_dataset`); then the units still to do become the rows of a Ray Dataset
(``ray.data.from_items``) and ``map_batches`` hands them, one at a time, to a fixed pool of actors.
Each actor loads the model once and runs, per unit, the local engine's own code: prepare (read,
check, tokenise), embed, write the part and rejects files, record the unit's marker. So the part
files, rejects, markers and metadata are the local engine's, a unit is recorded only after its files
are durable, and a rerun with either engine skips what either one recorded.

Only unit numbers and small result records travel through Ray's object store: actors read their own
input and write their own output (on a multi-node cluster, use ``s3://`` or a filesystem every node
mounts at the same path). Ray Data thus runs no read tasks that could starve behind the actors.

>>> from embedkit.batch import embed_dataset
>>> embed_dataset("s3://b/texts/", "s3://b/emb/", engine="ray", gpus_per_worker=1)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedkit import errors
from embedkit.batch.job import STOP_GRACE_SECONDS, _Runner, _Signals
from embedkit.batch.plan import Plan, Unit
from embedkit.batch.report import Progress
from embedkit.batch.settings import HostPlan, JobSettings
from embedkit.errors import ConfigError, EmbedkitError
from embedkit.settings import EngineSettings

log = logging.getLogger("embedkit.batch")

INSTALL_HINT = "pip install 'embedkit[ray]'"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # only unit numbers and result records pass through it
MAX_BLOCKS = 10_000
# What the workers' engine must agree on with the driver's fingerprint (see job._fingerprint).
ENGINE_FINGERPRINT = ("model_hash", "precision", "dimension", "normalize", "pooling", "prompt_name")


def require_ray() -> None:
    """Fail with an install hint when Ray Data is missing."""
    try:
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"--engine ray needs Ray Data, which is not installed ({exc}): {INSTALL_HINT}"
        ) from None


# ----------------------------------------------------------------------------------- sizing
@dataclass(frozen=True)
class Sizing:
    """How many actors, what each reserves, and the torch threads each runs."""

    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int
    cluster_cpus: float
    cluster_gpus: float
    nodes: int


def _fits(nodes: list[dict[str, Any]], cpus: float, gpus: float) -> int:
    """How many actors reserving ``cpus`` and ``gpus`` can be placed on ``nodes`` at once."""
    n = 0
    for node in nodes:
        k = math.inf
        if cpus > 0:
            k = min(k, math.floor(float(node.get("CPU", 0)) / cpus + 1e-9))
        if gpus > 0:
            k = min(k, math.floor(float(node.get("GPU", 0)) / gpus + 1e-9))
        n += 1_000_000 if k == math.inf else int(k)
    return n


def _floor(x: float) -> float:
    return math.floor(x * 100) / 100 if x >= 0.01 else math.floor(x * 1e4) / 1e4


def _describe_nodes(nodes: list[dict[str, Any]]) -> str:
    shown = ", ".join(
        f"{n.get('name', '?')}: {float(n.get('CPU', 0)):g} CPU, {float(n.get('GPU', 0)):g} GPU"
        for n in nodes[:5]
    )
    more = f" and {len(nodes) - 5} more" if len(nodes) > 5 else ""
    return f"{len(nodes)} node(s) ({shown}{more})"


def size_workers(
    nodes: list[dict[str, Any]],
    num_workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float = 0.0,
    where: str = "the Ray cluster",
) -> Sizing:
    """Size the actor pool for ``nodes`` (the alive nodes' resources, ``{"CPU": n, "GPU": n}``).

    Defaults: one worker per GPU (``gpus_per_worker`` > 0), else one per node; a CPU worker
    reserves its node's cores shared among the workers, while all of them together leave
    ``min(0.5, 25%)`` of the cluster's CPUs unreserved (for the driver and Ray's own tasks), so an
    actor pool never reserves every core. Raises :class:`ConfigError`, naming what the cluster
    has, when the request cannot be placed, instead of waiting for resources that never come.

    >>> s = size_workers([{"CPU": 2}], 2)
    >>> (s.cpus_per_worker, s.threads)
    (0.75, 1)
    >>> s = size_workers([{"CPU": 2}], 1)
    >>> (s.cpus_per_worker, s.threads)
    (1.5, 2)
    """
    gpus = float(gpus_per_worker or 0.0)
    if gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
        raise ConfigError(f"gpus_per_worker must be a fraction below 1 or a whole number, got {gpus:g}")
    if cpus_per_worker is not None and cpus_per_worker < 0:
        raise ConfigError(f"cpus_per_worker must be >= 0, got {cpus_per_worker:g}")
    if num_workers is not None and num_workers < 1:
        raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
    total_cpu = sum(float(n.get("CPU", 0)) for n in nodes)
    total_gpu = sum(float(n.get("GPU", 0)) for n in nodes)
    have = _describe_nodes(nodes)
    if gpus > 0 and total_gpu == 0:
        raise ConfigError(
            f"--gpus-per-worker {gpus:g}: {where} has no GPU ({have}); run on CPUs with "
            f"--gpus-per-worker 0, or connect to a cluster with GPUs (--ray-address / RAY_ADDRESS)"
        )
    if num_workers is None:
        num_workers = (
            _fits(nodes, 0.0, gpus) if gpus > 0 else max(sum(float(n.get("CPU", 0)) >= 1 for n in nodes), 1)
        )
    n = int(num_workers)
    reserve = min(0.5, 0.25 * total_cpu)
    share = max(total_cpu - reserve, 0.0) / n
    if cpus_per_worker is None:
        cap = min(share, 1.0) if gpus > 0 else share
        candidates = {cap} | {float(node.get("CPU", 0)) / k for node in nodes for k in range(1, n + 1)}
        fitting = [c for c in candidates if 0 < c <= cap and _fits(nodes, _floor(c), gpus) >= n]
        cpus = _floor(max(fitting)) if fitting else None
    else:
        cpus = float(cpus_per_worker)
    if cpus is None or _fits(nodes, cpus, gpus) < n:
        got = _fits(nodes, cpus if cpus is not None else 0.01, gpus)
        want = f"{n} worker(s) x {cpus if cpus is not None else '>0'} CPU" + (
            f" x {gpus:g} GPU" if gpus else ""
        )
        raise ConfigError(
            f"--engine ray: {want} cannot be placed on {where}: it has {total_cpu:g} CPU(s) and "
            f"{total_gpu:g} GPU(s) in {have}, room for {got} such worker(s). Ask for fewer workers "
            f"(--num-workers), smaller ones (--cpus-per-worker / --gpus-per-worker), or a bigger cluster"
        )
    if cpus_per_worker is not None and n * cpus > total_cpu - reserve:
        log.warning(
            "ray: %d worker(s) x %g CPU reserve %g of the cluster's %g CPUs, leaving less than %g for the "
            "driver and Ray's own tasks",
            n,
            cpus,
            n * cpus,
            total_cpu,
            reserve,
        )
    threads = max(1, int(cpus + 0.5))
    return Sizing(n, cpus, gpus, threads, total_cpu, total_gpu, len(nodes))


# ------------------------------------------------------------------------ the driver's model
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
    from embedkit.engine.device import _ALIASES

    require_ray()
    device = worker_device(settings)
    if device == "cpu":
        return dataclasses.replace(settings, device="cpu").build_embedder()
    precision = _ALIASES.get((settings.precision or "fp32").strip().lower())
    if precision is None:
        raise ConfigError(f"precision {settings.precision!r} is not one of fp32, bf16, fp16, int8")
    cpu_engine = dataclasses.replace(settings, device="cpu", precision="fp32").build_embedder()
    return _WorkersEngine(cpu_engine, precision, device)


def worker_engine_settings(embedder: Any, device: str) -> dict[str, Any]:
    """EngineSettings fields that rebuild ``embedder`` (the driver's) inside an actor."""
    return {
        "model": embedder.spec,
        "device": device,
        "precision": embedder.precision,
        "max_batch_tokens": 0 if embedder.auto_budget else int(embedder.max_batch_tokens),
        "batch_size": embedder.max_batch_size or 0,
        "normalize": embedder.normalize,
        "dimensions": embedder.dimensions,
        "truncate": embedder.truncate,
        "pooling": embedder.model.pooling,
        "prompt_name": embedder.prompt_name,
    }


# ------------------------------------------------------------------------------- the actors
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


def _rebuild_error(rec: dict[str, Any]) -> EmbedkitError:
    cls = getattr(errors, rec["type"], None)
    if isinstance(cls, type) and issubclass(cls, EmbedkitError):
        return cls(rec["message"])
    if rec.get("traceback"):
        log.error("ray worker %s failed on %s:\n%s", rec["worker"], rec["unit"], rec["traceback"])
    return EmbedkitError(
        f"ray worker {rec['worker']} failed on {rec['unit']}: {rec['type']}: {rec['message']}"
    )


class UnitWorker:
    """A Ray Data actor: loads the model once, then prepares, embeds, writes and records units.

    An error is returned as a record (and raised again by the driver), not thrown inside Ray, so the
    user sees embedkit's own message (a missing model, a storage error, ``--fail-fast``)."""

    def __init__(self, job: WorkerJob) -> None:
        t0 = time.perf_counter()
        self.job = job
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.error: dict[str, Any] | None = None
        self.first = True
        try:
            self.runner = self._open(job)
        except Exception as exc:
            self.error = _error_record(exc, self.id)
        self.load_seconds = time.perf_counter() - t0

    @staticmethod
    def _open(job: WorkerJob) -> _Runner:
        import torch

        from embedkit import __version__

        torch.set_num_threads(job.threads)
        if __version__ != job.version:
            raise ConfigError(
                f"Ray worker {socket.gethostname()} runs embedkit {__version__}, the driver {job.version}: "
                f"install the same version on every node"
            )
        embedder = EngineSettings(**job.engine).build_embedder()
        got = {
            "model_hash": embedder.content_hash,
            "precision": embedder.precision,
            "dimension": embedder.dimension,
            "normalize": embedder.normalize,
            "pooling": embedder.model.pooling,
            "prompt_name": embedder.prompt_name,
        }
        diff = {k: (job.fingerprint.get(k), v) for k, v in got.items() if job.fingerprint.get(k) != v}
        if diff:
            raise ConfigError(
                f"the engine on Ray worker {socket.gethostname()} differs from the driver's "
                f"({'; '.join(f'{k}: {a!r} vs {b!r}' for k, (a, b) in diff.items())}): every node must "
                f"see the same model files and support the same precision"
            )
        settings = dataclasses.replace(job.settings, progress="none")
        return _Runner(settings, embedder, job.plan, job.state, job.folder, job.hosts, [], None, None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [self._unit(int(k)) for k in batch["i"]]
        return {"i": np.asarray(batch["i"]), "result": np.array(results, dtype=object)}

    def _unit(self, k: int) -> str:
        if self.error is not None:
            return json.dumps(self.error)
        unit = self.job.todo[k]
        runner = self.runner
        before = runner.embed_seconds
        try:
            prepared = runner._prepare(unit)
            runner._check_fail_fast(prepared)
            vectors = runner._embed(prepared)  # the actor's stop flag is never set: always vectors
            runner._write(prepared, vectors)  # part + rejects durable, then the marker
            marker = runner.markers.pop()
        except Exception as exc:
            return json.dumps(_error_record(exc, self.id, unit))
        out = {
            "ok": True,
            "marker": marker,
            "worker": self.id,
            "node": socket.gethostname(),
            "embed_seconds": runner.embed_seconds - before,
            "load_seconds": round(self.load_seconds, 3),
        }
        if self.first:
            self.first = False
            out["engine"] = runner.embedder.describe()
        return json.dumps(out, default=str)


# ------------------------------------------------------------------------------- the driver
class RayRunner:
    """Runs this host's units still to do on a Ray actor pool. Same interface as the local runner
    (``run()``, ``markers``, ``units_done``, ``interrupted``), plus ``describe()`` for metadata."""

    def __init__(self, settings, embedder, plan, state, folder, hosts, todo, stream, stop_event) -> None:
        require_ray()
        self.s: JobSettings = settings
        self.embedder = embedder
        self.plan, self.state, self.folder, self.hosts = plan, state, folder, hosts
        self.todo: list[Unit] = todo
        self.stop = stop_event or threading.Event()
        self.progress = Progress(
            sum(u.rows or 0 for u in todo) or None,
            len(todo),
            mode=settings.progress,
            log_every=settings.log_every,
            stream=stream,
        )
        self.markers: list[dict[str, Any]] = []
        self.units_done = 0
        self.embed_seconds = 0.0
        self.interrupted = False
        self.sizing: Sizing | None = None
        self.address = "local"
        self.workers: dict[str, dict[str, Any]] = {}
        self.worker_engine: dict[str, Any] | None = None
        self.first_result_s: float | None = None
        self._t0 = time.perf_counter()

    def describe(self) -> dict[str, Any]:
        """The run's engine for ``metadata.json``: Ray address, pool sizing, per-worker counts."""
        import ray

        return {
            "engine": "ray",
            "ray_version": ray.__version__,
            "address": self.address,
            "sizing": dataclasses.asdict(self.sizing) if self.sizing else None,
            "first_result_seconds": None if self.first_result_s is None else round(self.first_result_s, 3),
            "workers": self.workers,
            "worker_engine": self.worker_engine,
        }

    def run(self) -> None:
        if not self.todo:
            return
        import ray

        self._t0 = time.perf_counter()
        with _Signals(self.stop):
            owned = False
            try:
                owned = self._connect()
                if not self.stop.is_set():
                    self._run_pool(owned)
            finally:
                if owned:
                    ray.shutdown()  # ends the actors too; a unit in flight is not recorded
                self.progress.close()
        self.interrupted = self.stop.is_set() and self.units_done < len(self.todo)

    def _connect(self) -> bool:
        """Connect to ``--ray-address`` / ``RAY_ADDRESS``, or start a local Ray; True if we did."""
        import ray

        if ray.is_initialized():
            self.address = "(already connected)"
            return False
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING, "ignore_reinit_error": True}
        t0 = time.perf_counter()
        if self.s.ray_address:
            self.address = self.s.ray_address
            try:
                ray.init(address=self.s.ray_address, **quiet)
            except Exception as exc:
                raise ConfigError(
                    f"cannot connect to the Ray cluster at {self.s.ray_address}: {exc}; check --ray-address "
                    f"/ RAY_ADDRESS, or leave both unset to start a local Ray"
                ) from None
        else:  # a private Ray for this job (Ray binds the node's own address; nothing leaves the host)
            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
            ray.init(
                address="local",
                num_cpus=len(os.sched_getaffinity(0)),
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                include_dashboard=False,
                **quiet,
            )
        log.info("ray: connected to %s in %.1fs", self.address, time.perf_counter() - t0)
        return True

    def _run_pool(self, owned: bool) -> None:
        import ray
        import ray.data

        from embedkit import __version__

        nodes = [
            {"name": n.get("NodeManagerAddress", "?"), **n.get("Resources", {})}
            for n in ray.nodes()
            if n.get("Alive")
        ]
        where = "the local Ray" if self.address == "local" else f"the Ray cluster at {self.address}"
        self.sizing = sz = size_workers(
            nodes, self.s.num_workers, self.s.cpus_per_worker, self.s.gpus_per_worker, where=where
        )
        device = worker_device(self.s)
        if len(nodes) > 1 and not self.s.output.startswith(("s3://", "gs://", "az://", "abfs://")):
            log.warning(
                "ray: %d nodes write to the local path %s: every node must mount it at that path "
                "(use s3:// otherwise)",
                len(nodes),
                self.s.output,
            )
        log.info(
            "ray: %d worker(s) x %g CPU (%d torch thread(s)) x %g GPU on %s, device %s; %d unit(s)",
            sz.num_workers,
            sz.cpus_per_worker,
            sz.threads,
            sz.gpus_per_worker,
            _describe_nodes(nodes),
            device,
            len(self.todo),
            extra={"event": "ray_pool", "workers": sz.num_workers},
        )
        job = WorkerJob(
            settings=self.s,
            engine=worker_engine_settings(self.embedder, device),
            plan=self.plan,
            state=self.state,
            folder=self.folder,
            hosts=self.hosts,
            todo=self.todo,
            fingerprint=self.state.fingerprint,
            threads=sz.threads,
            version=__version__,
        )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        if not log.isEnabledFor(logging.DEBUG):
            logging.getLogger("ray.data").setLevel(logging.ERROR)  # "progress bars disabled"...
        n = len(self.todo)
        ds = ray.data.from_items([{"i": k} for k in range(n)], override_num_blocks=min(n, MAX_BLOCKS))
        remote_args: dict[str, Any] = {"num_cpus": sz.cpus_per_worker}
        if sz.gpus_per_worker:
            remote_args["num_gpus"] = sz.gpus_per_worker
        ds = ds.map_batches(
            UnitWorker,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=sz.num_workers),
            fn_constructor_kwargs={"job": job},
            **remote_args,
        )
        self._consume(ds, owned)

    def _consume(self, ds: Any, owned: bool) -> None:
        """Iterate the results on a helper thread; the main thread stays free for signals."""
        results: queue.SimpleQueue = queue.SimpleQueue()
        halt = threading.Event()

        def pull() -> None:
            try:
                for row in ds.iter_rows():
                    results.put(("row", row))
                    if halt.is_set():
                        return  # closing the iterator shuts the pool down
                results.put(("end", None))
            except BaseException as exc:
                results.put(("fail", exc))

        puller = threading.Thread(target=pull, name="embedkit-ray", daemon=True)
        puller.start()
        try:
            while not self.stop.is_set():
                try:
                    kind, item = results.get(timeout=0.25)
                except queue.Empty:
                    continue
                if kind == "end":
                    return
                if kind == "fail":
                    raise _from_ray(item)
                self._take(item)
        finally:
            halt.set()
            while True:  # units finished (and recorded by their worker) before we stopped
                try:
                    kind, item = results.get_nowait()
                except queue.Empty:
                    break
                if kind == "row":
                    self._take(item, raise_errors=False)
            if not owned:  # we cannot end the caller's Ray: wait for the pool to wind down
                puller.join(timeout=STOP_GRACE_SECONDS)

    def _take(self, row: dict[str, Any], raise_errors: bool = True) -> None:
        res = json.loads(row["result"])
        if not res["ok"]:
            if raise_errors:
                raise _rebuild_error(res)
            return
        if self.first_result_s is None:
            self.first_result_s = time.perf_counter() - self._t0
        marker = res["marker"]
        self.markers.append(marker)
        self.units_done += 1
        self.embed_seconds += float(res["embed_seconds"])
        if res.get("engine") and self.worker_engine is None:
            self.worker_engine = res["engine"]
        w = self.workers.setdefault(
            res["worker"],
            {"node": res["node"], "load_seconds": res["load_seconds"], "units": 0, "rows": 0, "rejected": 0},
        )
        w["units"] += 1
        w["rows"] += int(marker["embedded"])
        w["rejected"] += int(marker["rejected"])
        self.progress.add(
            rows=int(marker["embedded"]),
            tokens=int(marker["tokens"]),
            rejects=int(marker["rejected"]),
            units=1,
        )


def _from_ray(exc: BaseException) -> EmbedkitError:
    """An exception out of Ray Data as an embedkit error (the embedkit one inside it, if any)."""
    seen: Any = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, EmbedkitError):
            return seen
        seen = seen.__cause__ or getattr(seen, "cause", None)
    return EmbedkitError(f"the Ray job failed: {type(exc).__name__}: {exc}")


__all__ = ["RayRunner", "Sizing", "UnitWorker", "driver_embedder", "require_ray", "size_workers"]

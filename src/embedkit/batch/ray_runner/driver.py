"""The driver's side of the Ray engine: connect (or start a local Ray), size the pool, stream the
units through ``map_batches`` and collect what the actors recorded."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import sys
import threading
import time
from typing import Any

from embedkit.batch.pipeline import UnitPipeline
from embedkit.batch.plan import Unit
from embedkit.batch.ray_runner.sizing import Sizing, describe_nodes, size_workers
from embedkit.batch.ray_runner.worker import (
    UnitWorker,
    WorkerJob,
    rebuild_error,
    require_ray,
    worker_device,
    worker_engine_settings,
)
from embedkit.batch.signals import STOP_GRACE_SECONDS, StopSignals
from embedkit.errors import ConfigError, EmbedkitError

log = logging.getLogger("embedkit.batch")

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # only unit numbers and result records pass through it
MAX_BLOCKS = 10_000


class RayRunner:
    """Runs this host's units still to do (``todo``) on a Ray actor pool, each actor running its own
    copy of ``pipeline`` (the driver's keeps the progress and the stop flag). Same interface as the
    local runner (``run()``, ``markers``, ``units_done``, ``interrupted``), plus ``describe()`` for
    metadata."""

    def __init__(self, pipeline: UnitPipeline, todo: list[Unit]) -> None:
        require_ray()
        self.pipeline = pipeline
        self.s, self.embedder, self.state = pipeline.settings, pipeline.embedder, pipeline.state
        self.todo = todo
        self.stop, self.progress = pipeline.stop, pipeline.progress
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
        self._started_at = ""
        self._wall0 = time.time()
        self._ready_at, self._done_at = float("inf"), 0.0  # first actor ready, last unit done (wall)

    def describe(self) -> dict[str, Any]:
        """The run's engine for ``metadata.json``: Ray address, pool sizing, per-worker counts."""
        import ray

        return {
            "engine": "ray",
            "ray_version": ray.__version__,
            "address": self.address,
            "sizing": dataclasses.asdict(self.sizing) if self.sizing else None,
            "first_result_seconds": None if self.first_result_s is None else round(self.first_result_s, 3),
            # start-up (connect, first actor started and its model loaded), then the pool's working time
            "startup_seconds": round(self._ready_at - self._wall0, 3) if self._done_at else None,
            "pool_seconds": round(self._done_at - self._ready_at, 3) if self._done_at else None,
            "workers": self.workers,
            "worker_engine": self.worker_engine,
        }

    def run(self) -> None:
        if not self.todo:
            return
        if not self.s.ray_address and "ray" not in sys.modules:
            # A private single-node Ray: bind it to loopback instead of the host's own address
            # (Ray reads this when it is imported; never set when joining a real cluster).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        self._t0, self._wall0 = time.perf_counter(), time.time()
        self._started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # as markers' finished_at
        owned = False
        try:
            with StopSignals(self.stop):
                owned = self._connect()
            # again: ray.init installs its own SIGTERM handler (sys.exit) in this process
            with StopSignals(self.stop):
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
        else:  # a private Ray for this job, on loopback when this process imported Ray itself
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
            describe_nodes(nodes),
            device,
            len(self.todo),
            extra={"event": "ray_pool", "workers": sz.num_workers},
        )
        job = WorkerJob(
            settings=self.s,
            engine=worker_engine_settings(self.embedder, device),
            plan=self.pipeline.plan,
            state=self.state,
            folder=self.pipeline.folder,
            hosts=self.pipeline.hosts,
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
            if puller.is_alive():  # stopped or failed: end the pool now, not after the next unit
                _end_execution(ds)
                puller.join(timeout=STOP_GRACE_SECONDS if not owned else 5.0)
            while True:  # units finished (and recorded by their worker) before we stopped
                try:
                    kind, item = results.get_nowait()
                except queue.Empty:
                    break
                if kind == "row":
                    self._take(item, raise_errors=False)
            self._collect_unseen()

    def _collect_unseen(self) -> None:
        """Count the units workers recorded whose results never reached us (we stopped listening)."""
        seen = {m["key"] for m in self.markers}
        unseen = {u.key for u in self.todo} - seen
        if not unseen:
            return
        for m in self.state.markers(unseen):
            if m.get("finished_at", "") >= self._started_at and not m.get("failed"):
                self.markers.append(m)
                self.units_done += 1

    def _take(self, row: dict[str, Any], raise_errors: bool = True) -> None:
        res = json.loads(row["result"])
        if not res["ok"]:
            if raise_errors:
                raise rebuild_error(res)
            return
        if self.first_result_s is None:
            self.first_result_s = time.perf_counter() - self._t0
        self._ready_at = min(self._ready_at, float(res["ready_at"]))
        self._done_at = max(self._done_at, float(res["done_at"]))
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


def _end_execution(ds: Any) -> None:
    """Shut a running Dataset's executor down (its actors with it), so that the iterator blocked on
    the next unit returns. Ray Data keeps the executor on the dataset being iterated; if a Ray
    version does not, the pool ends with the iterator or with ``ray.shutdown()`` instead."""
    executor = getattr(ds, "_current_executor", None)
    if executor is None:
        return
    try:
        executor.shutdown(force=True)
    except Exception:
        log.debug("ray: shutting the dataset's executor down failed", exc_info=True)


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

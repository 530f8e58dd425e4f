"""The driver's side of the Ray engine: connect (or start a local Ray), size the pool, feed unit
numbers to the actors and collect what they recorded."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
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
from embedkit.batch.signals import StopSignals
from embedkit.errors import ConfigError, EmbedkitError

log = logging.getLogger("embedkit.batch")

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # only the job, unit numbers and result records pass through it


class RayRunner:
    """Runs this host's units still to do (``todo``) on a Ray actor pool; the local runner's interface
    (``run()``, ``markers``, ``units_done``, ``interrupted``) plus ``describe()`` for metadata."""

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
        self.connect_s = 0.0  # ray.init (0 when already connected)
        self._actors: list[Any] = []
        self._t0 = time.perf_counter()
        self._started_at = ""
        self._wall0 = time.time()
        self._ready_at, self._done_at = float("inf"), 0.0  # first actor ready, last unit done (wall)
        self.driver_units = 0  # units the driver embedded itself while the pool started
        self._lock = threading.Lock()  # the unit queue and the results, shared with the driver's helper
        self._queue: list[int] = []
        self._helper: _DriverHelper | None = None

    def describe(self) -> dict[str, Any]:
        """The run's engine for ``metadata.json``: Ray address, pool sizing, per-worker counts."""
        import ray

        return {
            "engine": "ray",
            "ray_version": ray.__version__,
            "address": self.address,
            "connect_seconds": round(self.connect_s, 3),
            "sizing": dataclasses.asdict(self.sizing) if self.sizing else None,
            "first_result_seconds": None if self.first_result_s is None else round(self.first_result_s, 3),
            # start-up (connect, first actor started and its model loaded), then the pool's working time
            "startup_seconds": round(self._ready_at - self._wall0, 3) if self._done_at else None,
            "pool_seconds": round(self._done_at - self._ready_at, 3) if self._done_at else None,
            "workers": self.workers,
            "worker_engine": self.worker_engine,
            "driver_units": self.driver_units,
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
        # units by index, popped from the end in plan order by the actors, from the front by the driver
        self._queue = list(reversed(range(len(self.todo))))
        helper = self._start_helper(private=not self.s.ray_address and not ray.is_initialized())
        try:
            with StopSignals(self.stop):
                owned = self._connect()
            # again: ray.init installs its own SIGTERM handler (sys.exit) in this process
            with StopSignals(self.stop):
                if not self.stop.is_set():
                    self._run_pool()
                if helper is not None:
                    helper.finish()
        finally:
            if helper is not None:
                helper.finish(raise_error=False)
            if owned:
                ray.shutdown()  # ends the actors too; a unit in flight is not recorded
            self.pipeline.close()
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
        self.connect_s = time.perf_counter() - t0
        log.info("ray: connected to %s in %.1fs", self.address, self.connect_s)
        return True

    def _run_pool(self) -> None:
        import ray

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
        remote_args: dict[str, Any] = {"num_cpus": sz.cpus_per_worker}
        if sz.gpus_per_worker:
            remote_args["num_gpus"] = sz.gpus_per_worker
        # Plain actors, not Ray Data (docs/batch-jobs.md); a unit redone after a restart is idempotent.
        actor_cls = ray.remote(max_restarts=1, max_task_retries=1)(UnitWorker)
        self._actors = [actor_cls.options(**remote_args).remote(job) for _ in range(sz.num_workers)]
        self._consume()

    def _start_helper(self, private: bool) -> _DriverHelper | None:
        """With a private local Ray (this job starts it) and CPU actors, the driver's own engine,
        loaded for the fingerprint anyway, is the actors' engine: it embeds units from the queue until
        the first actor is ready, so the seconds Ray and the actors take to start are not idle."""
        if not private or worker_device(self.s) != "cpu" or len(self.todo) < 2:
            return None
        helper = self._helper = _DriverHelper(self)
        helper.start()
        return helper

    def _consume(self) -> None:
        """Feed unit numbers to the actors, two in flight each (the actor reads the next ahead), and
        take results as they come; the stop flag ends the pool at once. While no actor is ready yet,
        the driver runs units from the same queue itself (:meth:`_start_helper`)."""
        import ray

        actors, todo = self._actors, self._queue
        reserved: list[int | None] = [None] * len(actors)  # each actor's next unit, read ahead
        pending: dict[Any, int] = {}  # result ref -> actor
        helper = self._helper

        def submit(a: int) -> None:
            with self._lock:
                k = reserved[a]
                if k is None:
                    if not todo:
                        return
                    k = todo.pop()
                reserved[a] = todo.pop() if todo else None
            pending[actors[a].run_unit.remote(k, reserved[a])] = a

        try:
            if helper is not None:
                # queued first on each actor, so it answers as soon as the actor has loaded the model
                helper.ready = [actor.ready.remote() for actor in actors]
            for _ in range(2):
                for a in range(len(actors)):
                    submit(a)
            while (pending or (helper is not None and helper.busy())) and not self.stop.is_set():
                if not pending:
                    helper.wait(0.25)  # type: ignore[union-attr]
                    continue
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
                for ref in done:
                    a = pending.pop(ref)
                    self._take(ray.get(ref))
                    if not self.stop.is_set():
                        submit(a)
        except EmbedkitError:
            raise
        except Exception as exc:
            raise _from_ray(exc) from None
        finally:
            if helper is not None:  # its unit recorded (or abandoned at the stop flag) before the count below
                helper.finish(raise_error=False)
            if pending:  # stopped or failed: take what already finished, then end the pool
                try:
                    done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                    for ref in done:
                        self._take(ray.get(ref), raise_errors=False)
                except Exception:
                    log.debug("ray: collecting the last results failed", exc_info=True)
            self._end_pool()
            self._collect_unseen()

    def _end_pool(self) -> None:
        """Kill the actors (``ray.shutdown`` would too, but not on a cluster we only joined)."""
        import ray

        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                log.debug("ray: killing an actor failed", exc_info=True)
        self._actors = []

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

    def _take(self, result: str, raise_errors: bool = True) -> None:
        res = json.loads(result)
        if not res["ok"]:
            if raise_errors:
                raise rebuild_error(res)
            return
        if self.first_result_s is None:
            self.first_result_s = time.perf_counter() - self._t0
        self._ready_at = min(self._ready_at, float(res["ready_at"]))
        self._done_at = max(self._done_at, float(res["done_at"]))
        marker = res["marker"]
        with self._lock:
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


class _DriverHelper:
    """The driver embedding units itself, in a thread, from the runner's queue (the front, where the
    actors' read-ahead is not), until the first actor answers ``ready``; a unit it started, it ends."""

    def __init__(self, runner: RayRunner) -> None:
        self.runner = runner
        self.ready: list[Any] | None = None  # the actors' ready() refs, once they exist
        self.error: BaseException | None = None
        self._halt = threading.Event()  # take no new unit (the pool is over, or it failed to start)
        self._thread = threading.Thread(target=self._run, name="embedkit-driver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def busy(self) -> bool:
        if self.error is not None:
            raise self.error
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def finish(self, raise_error: bool = True) -> None:
        """Take no new unit, wait for the one in hand (the stop flag ends it sooner), and raise what
        it failed with. Without this, a pool that fails to start would leave the driver to run the
        whole job before the error is seen."""
        self._halt.set()
        self._thread.join()
        if raise_error and self.error is not None:
            raise self.error

    def _actor_ready(self) -> bool:
        import ray

        return self.ready is not None and bool(ray.wait(self.ready, num_returns=1, timeout=0)[0])

    def _run(self) -> None:
        import torch

        r = self.runner
        pipe = r.pipeline
        # one core fewer, for this thread only: Ray's processes and the actors starting use one
        # (measured on 2 cores: 1.11x local's wall time against 1.14x with both threads)
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))
        try:
            while not r.stop.is_set() and not self._halt.is_set() and not self._actor_ready():
                with r._lock:
                    if not r._queue:
                        return
                    k = r._queue.pop(0)
                before = pipe.embed_seconds
                marker = pipe.run_unit(r.todo[k])
                if marker is None:  # stopped inside the unit: abandoned, not recorded
                    return
                pipe.progress.add(rejects=int(marker["rejected"]))
                with r._lock:
                    r.embed_seconds += pipe.embed_seconds - before
                    r.markers.append(marker)
                    r.units_done += 1
                    r.driver_units += 1
        except BaseException as exc:
            self.error = exc


def _from_ray(exc: BaseException) -> EmbedkitError:
    """An exception out of Ray as an embedkit error (the embedkit one inside it, if any)."""
    seen: Any = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, EmbedkitError):
            return seen
        seen = seen.__cause__ or getattr(seen, "cause", None)
    return EmbedkitError(f"the Ray job failed: {type(exc).__name__}: {exc}")

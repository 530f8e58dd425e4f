"""The batch job: plan units -> read -> embed -> write -> record, with I/O overlapped with compute.

While the engine embeds unit *k* on the calling thread, a reader thread reads, checks and tokenises
unit *k+1* and a writer thread writes unit *k-1* and records it: at most three units are in memory,
whatever the size of the dataset. Inside a unit, texts are embedded longest first in chunks of a few
token budgets, and the stop flag (SIGTERM / SIGINT) is checked between chunks, so an interrupted job
saves its state within seconds: the unit in flight is abandoned (it was never recorded) and redone
by the next run.

>>> from embedkit.batch import embed_dataset
>>> summary = embed_dataset("data/", "out/", model="default")        # doctest: +SKIP
>>> summary.rows_embedded, summary.complete                          # doctest: +SKIP
(600, True)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Any

import numpy as np

from embedkit.batch.output import MERGED_NAME, OutputFolder, embeddings_table, rejects_table
from embedkit.batch.plan import Plan, Unit, make_plan
from embedkit.batch.prepare import Prepared, prepare_unit, reason_kind
from embedkit.batch.report import JobSummary, Progress, totals, versions
from embedkit.batch.settings import HostPlan, JobSettings, detect_hosts
from embedkit.batch.state import FORMAT, JobState, join_fs
from embedkit.errors import ConfigError, InputError, InterruptedJobError, JobStateError
from embedkit.io.fs import get_fs, remove, write_json
from embedkit.io.readers import StreamCache

log = logging.getLogger("embedkit.batch")

STOP_GRACE_SECONDS = 15.0  # after a signal, how long the writer may take to finish its unit


class _Background:
    """One daemon thread running submitted calls in order (daemon: a stuck read never blocks exit)."""

    def __init__(self, name: str) -> None:
        self._q: SimpleQueue = SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn, *args) -> Future:
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
        self._q.put(None)


class _Signals:
    """SIGTERM/SIGINT set the stop flag (first time) or exit at once (second time)."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.at: float | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
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


def embed_dataset(
    input: str | None = None,
    output: str | None = None,
    *,
    embedder: Any = None,
    settings: JobSettings | None = None,
    config: str | None = None,
    stop_event: threading.Event | None = None,
    progress_stream: Any = None,
    **options: Any,
) -> JobSummary:
    """Embed the texts of a dataset (Parquet, JSON Lines, CSV; local, ``s3://``, globs) into Parquet.

    ``options`` are :class:`~embedkit.batch.settings.JobSettings` fields (``model``, ``text_column``,
    ``precision``, ``num_shards``...); ``config`` a YAML file holding any of them (``options`` win).
    Pass a ready ``embedder`` to reuse a loaded model (its settings then replace the engine fields).
    Resumes a previous run of the same job in ``output``; raises
    :class:`~embedkit.errors.JobStateError` when ``output`` holds a job made with other settings
    (unless ``overwrite=True``) and :class:`~embedkit.errors.InterruptedJobError` (exit code 130,
    its ``summary`` attached) when stopped by SIGTERM/SIGINT or ``stop_event``.
    """
    if settings is None:
        settings = JobSettings.build({"input": input, "output": output, **options}, config=config)
    if not settings.input or not settings.output:
        raise ConfigError("embed needs an input and an output (INPUT OUTPUT, or --input-path/--output-path)")
    started = time.time()
    t0 = time.perf_counter()
    hosts = detect_hosts(settings.num_shards, settings.shard_index)
    if settings.single_file and not hosts.sees_everything:
        raise ConfigError(
            f"--single-file needs every host to see the whole input (hosts {list(hosts.hosts)} each see "
            f"their own files with --num-shards 1); drop --single-file, or let the hosts split the units"
        )
    if settings.num_workers and settings.engine == "local":
        log.info(
            "num_workers=%d accepted; the local runner drives one engine using %s threads",
            settings.num_workers,
            _threads(),
        )
    if embedder is None and settings.engine == "ray":
        from embedkit.batch.ray_runner import driver_embedder

        embedder = driver_embedder(settings)  # on the driver's CPU; the workers load their own
    if embedder is None:
        embedder = settings.build_embedder()
    modality = "text"
    if settings.modality != "text":  # images: img2dataset shards or URL lists, a CLIP model
        from embedkit.batch.images import make_image_plan, resolve_modality

        modality = resolve_modality(settings, embedder)
    if modality == "image":
        plan = make_image_plan(settings)
    else:
        plan = make_plan(
            settings.input,
            text_column=settings.text_column,
            id_column=settings.id_column,
            keep_columns=settings.keep_columns or (),
            unit_rows=settings.unit_rows,
            max_samples=settings.max_samples,
            fail_fast=settings.fail_fast,
            region=settings.aws_region,
        )
    out_fs, out_root = get_fs(settings.output, settings.aws_region)
    state = JobState(out_fs, out_root, _fingerprint(settings, embedder, plan))
    folder = OutputFolder(out_fs, out_root)
    if not settings.overwrite and not state.exists() and folder.scan():
        raise JobStateError(
            f"{settings.output} already holds part files that no embedkit job recorded "
            f"(e.g. {sorted(folder.scan())[0]}); choose an empty output folder, or --overwrite to replace them"
        )
    replaced = state.check(overwrite=settings.overwrite)
    if replaced:
        state.clear_merged()
        for name in ("metadata.json", MERGED_NAME):
            remove(out_fs, folder.path(name))
    state.remove_stale({u.key for u in plan.units}, all_temp=not hosts.multi)
    folder.remove_stale({u.part_name for u in plan.units}, all_temp=not hosts.multi)
    recorded = state.scan() if settings.resume else {}
    mine = plan.for_shard(hosts.num_shards, hosts.shard_index)
    # Skip recorded units; retry those recorded as unreadable (a transient error, or a fixed file).
    todo = [u for u in mine if recorded.get(u.key, True)]
    if state.merged():
        if settings.resume:  # the parts were merged away: the job is done as it stands
            todo = []
        else:  # redoing everything: parts become the truth again until the next merge
            state.clear_merged()
            remove(out_fs, folder.path(MERGED_NAME))
    log.info(
        "job: %d file(s), %d unit(s) in all; this host (%s, shard %d/%d): %d unit(s), %d already done; "
        "text column %r, ids from %s; model %s (%s, %d dims, %s)",
        len(plan.files),
        len(plan.units),
        hosts.host,
        hosts.shard_index + 1,
        hosts.num_shards,
        len(mine),
        len(mine) - len(todo),
        plan.text_column,
        repr(plan.id_column) if plan.id_column else "<file>:<row>",
        embedder.model.name,
        embedder.precision,
        embedder.dimension,
        embedder.device,
        extra={"event": "plan", "units_total": len(plan.units), "units_todo": len(todo)},
    )
    runner_cls: Any = _Runner
    if settings.engine == "ray":
        from embedkit.batch.ray_runner import RayRunner as runner_cls
    if modality == "image":
        from embedkit.batch.images import ImageRunner as runner_cls
    runner = runner_cls(settings, embedder, plan, state, folder, hosts, todo, progress_stream, stop_event)
    runner.run()
    summary = _finish(settings, embedder, plan, state, folder, hosts, mine, runner, started, t0)
    if runner.interrupted:
        left = len(todo) - runner.units_done
        err = InterruptedJobError(
            f"interrupted: {runner.units_done} unit(s) recorded this run, {left} left on this host; the "
            f"state is saved in {join_fs(out_fs, settings.output, '_state')}. Rerun the same command to "
            f"resume (recorded units are skipped)",
            output=settings.output,
        )
        err.summary = summary  # type: ignore[attr-defined]
        raise err
    return summary


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def model_fingerprint(embedder: Any) -> dict[str, Any]:
    """The engine's part of a job's fingerprint: what makes its vectors what they are."""
    return {
        "model_hash": embedder.content_hash,
        "precision": embedder.precision,
        "dimension": embedder.dimension,
        "normalize": embedder.normalize,
        "pooling": embedder.model.pooling,
        "prompt_name": embedder.prompt_name,
    }


def _fingerprint(settings: JobSettings, embedder: Any, plan: Plan) -> dict[str, Any]:
    """What must not change between runs that write into one dataset."""
    return {
        **model_fingerprint(embedder),
        "dtype": settings.dtype,
        "truncate": settings.truncate,
        "text_column": plan.text_column,
        "id_column": plan.id_column or "<file>:<row>",
        "keep_columns": list(plan.keep_columns),
        "unit_rows": settings.unit_rows,
        "max_samples": settings.max_samples,
        **getattr(plan, "fingerprint_extra", {}),  # image jobs: modality, captions, size cap
    }


class _Runner:
    """The three-stage pipeline over this host's units still to do."""

    def __init__(self, settings, embedder, plan, state, folder, hosts, todo, stream, stop_event) -> None:
        self.s: JobSettings = settings
        self.embedder = embedder
        self.plan: Plan = plan
        self.state: JobState = state
        self.folder: OutputFolder = folder
        self.hosts: HostPlan = hosts
        self.todo: list[Unit] = todo
        self.stop = stop_event or threading.Event()
        self.progress = Progress.for_units(todo, settings, stream)
        self.markers: list[dict[str, Any]] = []
        self.streams = StreamCache()  # the reader's open CSV / JSON Lines file, reused unit to unit
        self.units_done = 0
        self.embed_seconds = 0.0
        self.interrupted = False
        self.chunk_tokens = max(4 * int(embedder.max_batch_tokens), 1)

    def run(self) -> None:
        if not self.todo:
            return
        reader, writer = _Background("embedkit-read"), _Background("embedkit-write")
        pending_write: Future | None = None
        with _Signals(self.stop) as signals:
            try:
                pending_read: Future | None = reader.submit(self._prepare, self.todo[0])
                for k in range(len(self.todo)):
                    if self.stop.is_set() or pending_read is None:
                        break
                    prepared: Prepared = pending_read.result()
                    pending_read = None
                    if k + 1 < len(self.todo) and not self.stop.is_set():
                        pending_read = reader.submit(self._prepare, self.todo[k + 1])
                    self._check_fail_fast(prepared)
                    self.progress.add(rejects=prepared.rows_rejected)
                    vectors = self._embed(prepared)
                    if vectors is None:  # stopped inside the unit: abandon it, it is not recorded
                        break
                    if pending_write is not None:
                        pending_write.result()
                    pending_write = writer.submit(self._write, prepared, vectors)
                if pending_write is not None:
                    if self.stop.is_set():
                        budget = STOP_GRACE_SECONDS - (time.monotonic() - (signals.at or time.monotonic()))
                        try:
                            pending_write.result(timeout=max(budget, 1.0))
                        except TimeoutError:
                            log.warning("the last unit's write did not finish in time; it will be redone")
                    else:
                        pending_write.result()
            finally:
                if pending_write is not None and not pending_write.done():
                    # an error stopped the loop: let the unit already embedded be recorded
                    try:
                        pending_write.result(timeout=STOP_GRACE_SECONDS)
                    except Exception:
                        log.debug("the last unit's write failed after an earlier error", exc_info=True)
                reader.close()
                writer.close()
                self.streams.close()
                self.progress.close()
        self.interrupted = self.stop.is_set() and self.units_done < len(self.todo)

    def _prepare(self, unit: Unit) -> Prepared:
        return prepare_unit(
            self.plan.fs, self.plan, unit, self.embedder, truncate=self.s.truncate, streams=self.streams
        )

    def _check_fail_fast(self, p: Prepared) -> None:
        if self.s.fail_fast and p.rejects:
            src, row, _id, reason = p.rejects[0]
            where = f"{src}" if row is None else f"{src} row {row}"
            raise InputError(
                f"{where}: {reason} (--fail-fast; rerun without it to reject such rows and go on)"
            )

    def _embed(self, p: Prepared) -> np.ndarray | None:
        """Vectors of ``p``'s valid rows (in row order), embedded longest first in chunks; None if
        the stop flag was raised before the unit was done."""
        dim = self.embedder.dimension
        tok = p.tok
        if tok is None or len(tok) == 0:
            return np.empty((0, dim), np.float32)
        out = np.empty((len(tok), dim), np.float32)
        order = np.argsort(-tok.lengths, kind="stable")
        cum = np.cumsum(tok.lengths[order])
        cuts = np.searchsorted(cum, np.arange(self.chunk_tokens, int(cum[-1]), self.chunk_tokens))
        for idx in np.split(order, np.unique(cuts[(cuts > 0) & (cuts < len(order))])):
            if self.stop.is_set():
                return None
            t0 = time.perf_counter()
            out[idx] = self.embedder.embed_tokenized(tok.select(idx))
            self.embed_seconds += time.perf_counter() - t0
            self.progress.add(rows=len(idx), tokens=int(tok.lengths[idx].sum()))
        return out

    def _write(self, p: Prepared, vectors: np.ndarray) -> None:
        t0 = time.perf_counter()
        unit = p.unit
        table = embeddings_table(p.ids, vectors, self.s.dtype, p.extra) if p.num_valid else None
        rejects = rejects_table(p.rejects) if p.rejects else None
        self.folder.write_unit(unit.part_name, table, rejects)
        kinds = Counter(reason_kind(r[3]) for r in p.rejects)  # records in rejects/, by kind
        marker = {
            "source": unit.source,
            "start": unit.start,
            "stop": unit.stop,
            "part": unit.part_name if p.num_valid else None,
            "rejects": f"rejects/{unit.part_name}" if p.rejects else None,
            "rows_in": p.rows_in,
            "embedded": p.num_valid,
            "rejected": p.rows_rejected,
            "truncated": p.truncated,
            "tokens": p.tokens,
            "reject_kinds": dict(kinds),
            "failed": p.failed,
            "seconds": round(p.read_seconds + time.perf_counter() - t0, 3),
            "host": self.hosts.host,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.state.record(unit.key, marker, failed=p.failed)  # only now is the unit done
        self.markers.append({"key": unit.key, **marker})
        self.units_done += 1
        self.progress.add(units=1)


def _finish(settings, embedder, plan, state, folder, hosts, mine, runner, started, t0) -> JobSummary:
    """Totals, per-host and (once every unit of every host is recorded) job metadata and merge."""
    plan_keys = {u.key for u in plan.units}
    all_done = state.done_keys() & plan_keys
    markers = state.markers(all_done)
    mine_keys = {u.key for u in mine}
    my_markers = [m for m in markers if m["key"] in mine_keys]
    complete = plan_keys <= all_done
    wall = time.perf_counter() - t0
    mine_tot = totals(my_markers)
    summary = JobSummary(
        output=settings.output,
        host=hosts.host,
        num_shards=hosts.num_shards,
        shard_index=hosts.shard_index,
        units_total=len(mine),
        units_skipped=len(mine) - len(runner.todo),
        units_processed=runner.units_done,
        rows_in=mine_tot["rows_in"],
        rows_embedded=mine_tot["embedded"],
        rows_rejected=mine_tot["rejected"],
        rows_truncated=mine_tot["truncated"],
        tokens=mine_tot["tokens"],
        files_rejected=mine_tot["files_rejected"],
        reject_kinds=mine_tot["reject_kinds"],
        rows_embedded_this_run=sum(m["embedded"] for m in runner.markers),
        tokens_this_run=sum(m["tokens"] for m in runner.markers),
        wall_seconds=wall,
        complete=complete,
        interrupted=runner.interrupted,
    )
    if runner.interrupted:
        return summary
    base = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": round(wall, 3),
    }
    if hosts.multi:
        path = folder.path(f"metadata-{hosts.host}.json")
        write_json(
            folder.fs,
            path,
            {
                **_metadata(
                    settings, embedder, plan, state, hosts, my_markers, summary, base, "host", len(mine)
                ),
                **_runner_info(runner),
            },
        )
        summary.metadata_path = join_fs(folder.fs, settings.output, f"metadata-{hosts.host}.json")
    if complete and hosts.sees_everything:
        single = None
        if settings.single_file:
            single = _merge(state, folder, plan, markers)
            summary.single_file = join_fs(folder.fs, settings.output, MERGED_NAME)
        meta = _metadata(
            settings, embedder, plan, state, hosts, markers, summary, base, "job", len(plan.units)
        )
        meta["layout"]["single_file"] = single
        meta.update(_runner_info(runner))
        write_json(folder.fs, folder.path("metadata.json"), meta)
        summary.metadata_path = join_fs(folder.fs, settings.output, "metadata.json")
    return summary


def _runner_info(runner: Any) -> dict[str, Any]:
    """``{"runner": ...}`` for metadata.json when the runner describes itself (the Ray engine:
    address, pool sizing, per-worker counts of this run)."""
    describe = getattr(runner, "describe", None)
    return {"runner": describe()} if describe else {}


def _merge(state: JobState, folder: OutputFolder, plan: Plan, markers: list[dict[str, Any]]) -> str:
    """Merge the parts into embeddings.parquet (once), then delete them (the img2dataset CLIP job's
    layout)."""
    if not state.merged():
        order = {u.key: i for i, u in enumerate(plan.units)}
        parts = [m["part"] for m in sorted(markers, key=lambda m: order[m["key"]]) if m.get("part")]
        rows = folder.merge(parts)
        state.record_merged({"rows": rows, "parts": len(parts)})
        log.info("merged %d part(s), %d rows, into %s", len(parts), rows, MERGED_NAME)
    for name in folder.part_names():
        remove(folder.fs, folder.path(name))
    return MERGED_NAME


def _metadata(settings, embedder, plan, state, hosts, markers, summary, timings, scope, units_total) -> dict:
    tot = totals(markers)
    wall = timings["wall_seconds"] or 1e-9
    return {
        "format": FORMAT,
        "scope": scope,
        "complete": scope == "host" or summary.complete,
        "model": {
            "name": embedder.model.name,
            "spec": embedder.spec,
            "path": str(embedder.model.path),
            "content_hash": embedder.content_hash,
            "max_seq_length": embedder.max_seq_length,
            "pooling": embedder.model.pooling,
        },
        "dimension": embedder.dimension,
        "normalize": embedder.normalize,
        "precision": embedder.precision,
        "dtype": settings.dtype,
        "truncate": settings.truncate,
        "prompt_name": embedder.prompt_name,
        "text_column": plan.text_column,
        "id_column": plan.id_column or "<file>:<row>",
        "keep_columns": list(plan.keep_columns),
        "input": settings.input,
        "output": settings.output,
        "rows": {
            "in": tot["rows_in"],
            "embedded": tot["embedded"],
            "rejected": tot["rejected"],
            "truncated": tot["truncated"],
        },
        "tokens": tot["tokens"],
        "files_rejected": tot["files_rejected"],
        "reject_kinds": tot["reject_kinds"],
        "units": {"total": units_total, "done": len(markers), "rows_per_unit": settings.unit_rows},
        "files": tot["files"],
        "layout": {"parts": "part-*.parquet", "rejects": "rejects/part-*.parquet", "single_file": None},
        "timings": {**timings, "unit_seconds_total": tot["unit_seconds"]},
        "throughput": {
            "rows_per_second": round(summary.rows_embedded_this_run / wall, 2),
            "tokens_per_second": round(summary.tokens_this_run / wall, 2),
        },
        "hosts": {
            "current": hosts.host,
            "all": list(hosts.hosts),
            "num_shards": hosts.num_shards,
            "shard_index": hosts.shard_index,
            "processed_by": tot["hosts"],
        },
        "engine": embedder.describe(),
        "versions": versions(),
        "fingerprint_id": state.fp_id,
        **getattr(plan, "metadata_extra", {}),  # image jobs: modality, layouts, fetch settings
    }

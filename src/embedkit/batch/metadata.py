"""A job's fingerprint, its ``metadata.json`` and the ``--single-file`` merge: what is written once
this host's units are done (per host with several hosts; for the job once every unit is recorded).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from embedkit.batch.output import MERGED_NAME, OutputFolder
from embedkit.batch.pipeline import UnitPipeline
from embedkit.batch.plan import Plan, Unit
from embedkit.batch.report import JobSummary, totals, versions
from embedkit.batch.settings import JobSettings
from embedkit.batch.state import FORMAT, JobState
from embedkit.engine.multi import DENSE_ONLY
from embedkit.io.fs import join_fs, remove, write_json

log = logging.getLogger("embedkit.batch")


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


def job_fingerprint(settings: JobSettings, embedder: Any, plan: Plan) -> dict[str, Any]:
    """What must not change between runs that write into one dataset. ``outputs`` is part of it
    only when it is not dense alone, so that dense jobs keep the fingerprint (and stay resumable)
    they had before there were other outputs."""
    return {
        **model_fingerprint(embedder),
        "dtype": settings.dtype,
        "truncate": settings.truncate,
        "text_column": plan.text_column,
        "id_column": plan.id_column or "<file>:<row>",
        "keep_columns": list(plan.keep_columns),
        "unit_rows": settings.unit_rows,
        "max_samples": settings.max_samples,
        **({"outputs": list(settings.outputs)} if settings.outputs != DENSE_ONLY else {}),
        **plan.fingerprint_extra,  # image jobs: modality, captions, size cap
    }


def outputs_metadata(settings: JobSettings, embedder: Any) -> dict[str, Any]:
    """``metadata.json``'s account of the outputs: which, and what readers of the sparse and ColBERT
    columns need (the vocabulary size, the shape of the CSR export; the ColBERT dimension)."""
    meta: dict[str, Any] = {"outputs": list(settings.outputs)}
    if "sparse" in settings.outputs:
        meta["vocab_size"] = int(embedder.model.transformer.config.vocab_size)
    if "colbert" in settings.outputs:
        meta["colbert_dimension"] = int(embedder.model.heads["colbert"].out_features)
    return meta


def finish_job(
    pipeline: UnitPipeline, runner: Any, mine: list[Unit], started: float, t0: float
) -> JobSummary:
    """Totals, per-host and (once every unit of every host is recorded) job metadata and merge.

    ``runner`` ran this host's units still to do (``todo``, ``units_done``, ``markers`` of this run,
    ``interrupted``, and ``describe()`` when it has more to say in ``metadata.json``)."""
    settings, plan, state = pipeline.settings, pipeline.plan, pipeline.state
    folder, hosts = pipeline.folder, pipeline.hosts
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
        meta = job_metadata(pipeline, my_markers, summary, base, "host", len(mine))
        write_json(folder.fs, folder.path(f"metadata-{hosts.host}.json"), {**meta, **_runner_info(runner)})
        summary.metadata_path = join_fs(folder.fs, settings.output, f"metadata-{hosts.host}.json")
    if complete and hosts.sees_everything:
        single = None
        if settings.single_file:
            single = merge_parts(state, folder, plan, markers)
            summary.single_file = join_fs(folder.fs, settings.output, MERGED_NAME)
        meta = job_metadata(pipeline, markers, summary, base, "job", len(plan.units))
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


def merge_parts(state: JobState, folder: OutputFolder, plan: Plan, markers: list[dict[str, Any]]) -> str:
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


def job_metadata(
    pipeline: UnitPipeline, markers: list, summary: JobSummary, timings: dict, scope: str, units_total: int
) -> dict:
    """``metadata.json`` of a host's share (``scope="host"``, ``markers`` its units') or of the
    whole job (``"job"``)."""
    settings, embedder, plan, hosts = pipeline.settings, pipeline.embedder, pipeline.plan, pipeline.hosts
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
        **outputs_metadata(settings, embedder),
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
        "fingerprint_id": pipeline.state.fp_id,
        **plan.metadata_extra,  # image jobs: modality, layouts, fetch settings
    }

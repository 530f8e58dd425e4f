"""The batch job's orchestration: settings -> modality -> plan -> state checks -> run -> finish.

>>> from embedkit.batch import embed_dataset
>>> summary = embed_dataset("data/", "out/", model="default")        # doctest: +SKIP
>>> summary.rows_embedded, summary.complete                          # doctest: +SKIP
(600, True)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from embedkit.batch.metadata import finish_job, job_fingerprint
from embedkit.batch.output import MERGED_NAME, OutputFolder
from embedkit.batch.pipeline import LocalRunner, Modality, TextModality, UnitPipeline
from embedkit.batch.report import JobSummary, Progress
from embedkit.batch.settings import JobSettings, detect_hosts
from embedkit.batch.state import JobState
from embedkit.engine.multi import DENSE_ONLY, check_outputs
from embedkit.errors import ConfigError, InterruptedJobError, JobStateError
from embedkit.io.fs import get_fs, join_fs, remove

log = logging.getLogger("embedkit.batch")


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

    ``options`` are :class:`~embedkit.batch.settings.JobSettings` fields, ``config`` a YAML file of
    them (``options`` win); a ready ``embedder`` is reused. Resumes a previous run of the same job;
    raises :class:`~embedkit.errors.JobStateError` on another job's output (unless ``overwrite``) and
    :class:`~embedkit.errors.InterruptedJobError` (``summary`` attached) when stopped.
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
        from embedkit.engine import build_embedder

        embedder = build_embedder(settings)
    if settings.outputs != DENSE_ONLY:  # BGE-M3's heads: a model without them fails before any work
        check_outputs(settings.outputs, getattr(embedder, "outputs", DENSE_ONLY), embedder.model.name)
    modality: Modality = TextModality()
    if settings.modality != "text":  # images: img2dataset shards or URL lists, a CLIP model
        from embedkit.batch.images import ImageModality, resolve_modality

        if resolve_modality(settings, embedder) == "image":
            if settings.outputs != DENSE_ONLY:
                raise ConfigError(
                    f"--outputs {','.join(settings.outputs)}: {settings.input} holds images, and image "
                    f"jobs write dense vectors only; drop --outputs"
                )
            modality = ImageModality()
    plan = modality.plan(settings)
    out_fs, out_root = get_fs(settings.output, settings.aws_region)
    state = JobState(out_fs, out_root, job_fingerprint(settings, embedder, plan))
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
    progress = Progress.for_units(todo, settings, progress_stream)
    stop = stop_event or threading.Event()
    pipeline = UnitPipeline(settings, embedder, plan, state, folder, hosts, modality, progress, stop)
    runner: Any = LocalRunner(pipeline, todo)
    if settings.engine == "ray" and modality.name == "text":  # (images run on the local engine only)
        from embedkit.batch.ray_runner import RayRunner

        runner = RayRunner(pipeline, todo)
    runner.run()
    summary = finish_job(pipeline, runner, mine, started, t0)
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

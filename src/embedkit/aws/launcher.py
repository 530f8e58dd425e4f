"""Launch a prepared job on SageMaker: stage, create, wait (tailing logs), retry, download.

With ``--sagemaker-retries N`` a Failed job is relaunched under ``<name>-r<k>`` onto the same output,
with the previous run's state as an extra input, so it skips the units already uploaded.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, TextIO

from embedkit.aws import s3
from embedkit.aws.job import PreparedJob, attempt_spec
from embedkit.aws.logs import wait_for_job
from embedkit.aws.processing import build_processing_request
from embedkit.aws.session import client, region_name
from embedkit.errors import EmbedkitError, InterruptedJobError

log = logging.getLogger("embedkit.sagemaker")


def stage(job: PreparedJob, s3_client: Any = None) -> int:
    """Upload the code channel and the local inputs; returns the number of files uploaded."""
    s3_client = s3_client or client("s3", job.settings.region)
    code = s3.s3_join(job.staging, "code")
    n = 0
    for rel, content in sorted(job.code_files.items()):
        url = s3.s3_join(code, rel)
        if isinstance(content, Path):
            s3.upload_file(str(content), url, s3_client)
        else:
            s3.upload_bytes(content, url, s3_client)
        n += 1
    for local, url in job.uploads:
        s3.upload_file(local, url, s3_client)
        n += 1
    log.info("staged %d file(s) under %s", n, job.staging)
    return n


def console_url(job_name: str, region: str) -> str:
    return (
        f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/processing-jobs/{job_name}"
    )


def create(job: PreparedJob, attempt: int = 0, sm: Any = None, s3_client: Any = None) -> dict:
    """Send CreateProcessingJob for ``attempt``; returns the request that was sent."""
    sm = sm or client("sagemaker", job.settings.region)
    s3_client = s3_client or client("s3", job.settings.region)
    spec = attempt_spec(job, attempt, lambda url: s3.has_objects(url, s3_client))
    request = build_processing_request(spec)
    try:
        sm.create_processing_job(**request)
    except sm.exceptions.ClientError as exc:
        raise EmbedkitError(f"SageMaker refused processing job {spec.job_name}: {exc}") from exc
    region = region_name(job.settings.region)
    log.info("started processing job %s (%s)", spec.job_name, console_url(spec.job_name, region))
    return request


def _reason(desc: dict) -> str:
    parts = [desc.get("FailureReason"), desc.get("ExitMessage")]
    return "; ".join(p.strip() for p in parts if p) or "no reason given"


def launch(job: PreparedJob, *, sm: Any = None, logs_client: Any = None, out: TextIO | None = None) -> int:
    """Stage, create and (with ``--sagemaker-wait``) follow the job and its retries; returns 0 on
    success, raises :class:`EmbedkitError` when the last attempt failed."""
    settings = job.settings
    sm = sm or client("sagemaker", settings.region)
    s3_client = client("s3", settings.region)
    stage(job, s3_client)
    out = out or sys.stdout
    attempts = settings.retries + 1
    if not settings.wait and settings.retries:
        log.warning(
            "--sagemaker-retries needs --sagemaker-wait yes (someone must watch the job); not retrying"
        )
    for attempt in range(attempts):
        request = create(job, attempt, sm, s3_client)
        name = request["ProcessingJobName"]
        out.write(f"embedkit: processing job {name} started\n")
        out.flush()
        if not settings.wait:
            return 0
        try:
            desc = wait_for_job(
                sm,
                name,
                logs_client=logs_client or client("logs", settings.region),
                poll_seconds=settings.log_poll,
                out=out,
            )
        except KeyboardInterrupt:
            out.write(
                f"embedkit: stopped waiting; job {name} goes on. Stop it with: aws sagemaker "
                f"stop-processing-job --processing-job-name {name}\n"
            )
            raise
        status = desc["ProcessingJobStatus"]
        if status == "Completed":
            out.write(f"embedkit: processing job {name} completed\n")
            download_outputs(job, s3_client)
            return 0
        reason = _reason(desc)
        if status == "Stopped":
            raise InterruptedJobError(
                f"processing job {name} was stopped ({reason}); rerun the same command to resume"
            )
        if attempt + 1 < attempts:
            out.write(
                f"embedkit: processing job {name} failed ({reason}); relaunching onto the same output "
                f"(retry {attempt + 1} of {settings.retries})\n"
            )
            continue
        raise EmbedkitError(
            f"processing job {name} failed: {reason} (logs: {console_url(name, region_name(settings.region))})"
        )
    return 1  # pragma: no cover - the loop returns or raises


def download_outputs(job: PreparedJob, s3_client: Any = None) -> None:
    """Copy outputs staged for local folders (``OUT`` not on S3) to those folders."""
    for url, folder in job.downloads:
        files = s3.download_prefix(url, folder, s3_client)
        log.info("downloaded %d file(s) from %s to %s", len(files), url, folder)

"""``--sagemaker-run local``: run the job's container entrypoint here, as SageMaker would.

Host by host (``algo-1`` .. ``algo-N``), a temporary root gets the ``/opt/ml`` layout with the
input channels copied in (sharded as SageMaker shards them), the bootstrap runs with the request's
arguments and environment, and the outputs are uploaded. Nothing is installed (docs/sagemaker.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from embedkit.aws import s3
from embedkit.aws.container import CODE_DIR, JOB_CONFIG, RESOURCE_CONFIG
from embedkit.aws.job import PreparedJob, attempt_spec
from embedkit.aws.processing import build_processing_request
from embedkit.errors import EmbedkitError

log = logging.getLogger("embedkit.sagemaker")


def _is_file_url(url: str) -> bool:
    return url.startswith("file://")


def _state_exists(url: str) -> bool:
    if _is_file_url(url):
        path = url[len("file://") :]
        return os.path.isdir(path) and any(files for _, _, files in os.walk(path))
    return s3.has_objects(url)


def write_code(job: PreparedJob) -> str:
    """Write the code channel into the local staging folder; returns the folder."""
    folder = os.path.join(job.staging, "code")
    for rel, content in job.code_files.items():
        target = os.path.join(folder, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            Path(target).write_bytes(content)
    return folder


def _fetch_channel(channel: dict, dest: str, host_index: int, hosts: int) -> int:
    """Copy one input channel into ``dest`` as SageMaker would; returns the file count."""
    s3_input = channel["S3Input"]
    uri = s3_input["S3Uri"]
    sharded = s3_input["S3DataDistributionType"] == "ShardedByS3Key" and hosts > 1

    def keep(i: int, _key: str) -> bool:
        return not sharded or i % hosts == host_index

    os.makedirs(dest, exist_ok=True)
    if not _is_file_url(uri):
        return len(s3.download_prefix(uri, dest, select=keep))
    path = uri[len("file://") :]
    if os.path.isfile(path):
        if keep(0, path):
            shutil.copyfile(path, os.path.join(dest, os.path.basename(path)))
            return 1
        return 0
    n = 0
    for i, (full, rel) in enumerate(s3.local_files(path)):
        if keep(i, rel):
            target = os.path.join(dest, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(full, target)
            n += 1
    return n


def _upload_output(output: dict, src: str) -> int:
    uri = output["S3Output"]["S3Uri"]
    if not os.path.isdir(src):
        return 0
    if _is_file_url(uri):
        dest = uri[len("file://") :]
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return sum(len(f) for _, _, f in os.walk(src))
    return s3.upload_tree(src, uri)


def run_host(request: dict, host_index: int, *, keep_root: str | None = None) -> int:
    """Run host ``host_index`` of ``request`` here; returns the container's exit code."""
    count = request["ProcessingResources"]["ClusterConfig"]["InstanceCount"]
    hosts = [f"algo-{i + 1}" for i in range(count)]
    root = keep_root or tempfile.mkdtemp(prefix=f"embedkit-{hosts[host_index]}-")
    try:
        rc_path = root + RESOURCE_CONFIG
        os.makedirs(os.path.dirname(rc_path), exist_ok=True)
        Path(rc_path).write_text(json.dumps({"current_host": hosts[host_index], "hosts": hosts}))
        Path(root + JOB_CONFIG).write_text(json.dumps(request, indent=2, default=str))
        for channel in request.get("ProcessingInputs", []):
            n = _fetch_channel(channel, root + channel["S3Input"]["LocalPath"], host_index, count)
            log.info("%s: input %s: %d file(s)", hosts[host_index], channel["InputName"], n)
        outputs = request.get("ProcessingOutputConfig", {}).get("Outputs", [])
        for output in outputs:
            os.makedirs(root + output["S3Output"]["LocalPath"], exist_ok=True)
        env = {
            **os.environ,
            **request.get("Environment", {}),
            "EMBEDKIT_SM_ROOT": root,
            "EMBEDKIT_SM_LOCAL": "1",
            "EMBEDKIT_SM_PYTHON": sys.executable,
        }
        for k in ("AWS_REGION", "AWS_DEFAULT_REGION"):  # this machine's AWS settings win locally
            if k in os.environ:
                env[k] = os.environ[k]
        app = request["AppSpecification"]
        entry = list(app["ContainerEntrypoint"])
        entry = [root + a if a.startswith(CODE_DIR) else a for a in entry]
        cmd = entry + list(app.get("ContainerArguments", []))
        log.info("%s: running %s", hosts[host_index], " ".join(app["ContainerEntrypoint"]))
        code = subprocess.run(cmd, env=env, check=False).returncode
        # Continuous uploads happen while the job runs on SageMaker; here they happen at the end,
        # whatever the exit code, as a killed SageMaker job would have uploaded its finished parts.
        for output in outputs:
            n = _upload_output(output, root + output["S3Output"]["LocalPath"])
            log.info("%s: output %s: uploaded %d file(s)", hosts[host_index], output["OutputName"], n)
        return code
    finally:
        if keep_root is None:
            shutil.rmtree(root, ignore_errors=True)


def run_local(job: PreparedJob, *, out: Any = None) -> int:
    """Run every host of ``job`` in turn. As on SageMaker, all hosts of an attempt get the same
    request, and a failed attempt is relaunched whole (``--sagemaker-retries``), resuming."""
    out = out or sys.stdout
    write_code(job)
    try:
        count = job.spec.instance_count
        for attempt in range(job.settings.retries + 1):
            request = build_processing_request(attempt_spec(job, attempt, _state_exists), local=True)
            failed = []
            for host_index in range(count):
                out.write(
                    f"embedkit: local run of {request['ProcessingJobName']}, host algo-{host_index + 1} of {count}\n"
                )
                out.flush()
                code = run_host(request, host_index)
                if code != 0:
                    failed.append(f"algo-{host_index + 1} (exit code {code})")
            if not failed:
                return 0
            if attempt < job.settings.retries:
                out.write(f"embedkit: {', '.join(failed)} failed; relaunching onto the same output\n")
        raise EmbedkitError(f"local run of {job.job_name} failed on {', '.join(failed)}")
    finally:
        shutil.rmtree(job.staging, ignore_errors=True)

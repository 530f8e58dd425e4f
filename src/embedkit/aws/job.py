"""Turn "run this program with these inputs and outputs" into a staged processing job.

A door describes its run as a :class:`RemoteProgram` (:class:`Ref` placeholders where container
paths go); :func:`prepare` resolves the paths to channels, plans the uploads and the code channel,
and builds the spec that :mod:`embedkit.aws.launcher` launches or :mod:`embedkit.aws.local` runs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedkit.aws import s3
from embedkit.aws.container import (
    ARGUMENTS_FILE,
    BOOTSTRAP,
    CODE_CHANNEL,
    CODE_DIR,
    MANIFEST,
    MANIFEST_FORMAT,
    SETTINGS_FILE,
)
from embedkit.aws.names import job_name as make_job_name
from embedkit.aws.names import retry_name, sanitize
from embedkit.aws.processing import (
    INPUT_ROOT,
    OUTPUT_ROOT,
    Channel,
    OutputChannel,
    ProcessingJobSpec,
    arguments_fit,
)
from embedkit.aws.settings import SageMakerSettings, default_image
from embedkit.errors import ConfigError
from embedkit.io.fs import glob_root, has_glob

log = logging.getLogger("embedkit.sagemaker")

LOCAL_ROLE = "arn:aws:iam::000000000000:role/embedkit-local-run"
RESUME_PREFIX = "embedkit-resume-"


@dataclass(frozen=True)
class Ref:
    """Placeholder in :attr:`RemoteProgram.arguments` for the container path of a channel."""

    kind: str  # "input", "output" or "dependency"
    name: str


@dataclass
class InputSpec:
    """An input: a local path, folder or glob, or an ``s3://`` URL, prefix or glob."""

    name: str
    source: str
    shardable: bool = False  # split across instances by S3 key when there are several


@dataclass
class OutputSpec:
    """An output: ``destination`` (``s3://``) or, for a local folder, staged and downloaded after."""

    name: str
    destination: str
    resume_subdir: str | None = None  # a previous run's state under the output, restored on start
    upload_mode: str | None = None  # None: the settings' output mode


@dataclass
class RemoteProgram:
    """What to run in the container and with which files."""

    program: str  # "embedkit" or the path of a local Python script
    arguments: list[str | Ref]
    inputs: list[InputSpec] = field(default_factory=list)
    outputs: list[OutputSpec] = field(default_factory=list)
    dependencies: dict[str, str] = field(default_factory=dict)
    base_job_name: str = "embedkit"
    # added when an input is split across instances by S3 key (each host then sees only its files)
    sharded_arguments: list[str] = field(default_factory=list)
    # The program's complete, resolved settings (a door's settings object as a dict, Refs where
    # container paths go), written to the code channel as settings.json; None: the program has none.
    settings: dict[str, Any] | None = None
    # merged into ``settings`` when an input is split across instances by S3 key
    sharded_settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedJob:
    """A job ready to launch: its spec, what to upload, and what to download afterwards."""

    spec: ProcessingJobSpec
    settings: SageMakerSettings
    local: bool
    staging: str  # s3:// prefix of this job's staged files (a temp folder for a local run)
    code_files: dict[str, bytes | Path]  # relative name in the code channel -> content
    uploads: list[tuple[str, str]]  # (local file, s3 url) of local inputs
    downloads: list[tuple[str, str]]  # (s3 prefix, local folder) after success
    resumable: list[OutputChannel]  # outputs whose previous state a (re)launch restores
    resume_subdirs: dict[str, str]
    base_inputs: list[Channel] = field(default_factory=list)

    @property
    def job_name(self) -> str:
        return self.spec.job_name


def _url_of(path: str) -> str:
    return "file://" + os.path.abspath(path)


class _Resolver:
    """Resolves inputs to channels and container paths, collecting uploads."""

    def __init__(self, staging: str, local: bool) -> None:
        self.staging = staging
        self.local = local
        self.uploads: list[tuple[str, str]] = []

    def input(self, spec: InputSpec) -> tuple[str, str]:
        """(S3Uri of the channel, container path the program is given)."""
        mount = f"{INPUT_ROOT}/{spec.name}"
        src = spec.source
        if s3.is_s3(src):
            if has_glob(src):
                root, pattern = glob_root(src)
                return root + "/", f"{mount}/{pattern}"
            if s3.is_object(src):
                return src, f"{mount}/{src.rsplit('/', 1)[-1]}"
            if not s3.has_objects(src.rstrip("/") + "/"):
                raise ConfigError(f"input {spec.name}: nothing under {src}; check the URL")
            return src.rstrip("/") + "/", mount
        dest = s3.s3_join(self.staging, "inputs", spec.name) if not self.local else ""
        if has_glob(src):
            root, pattern = glob_root(os.path.abspath(src))
            matches = sorted(
                p for p in glob.glob(os.path.join(root, pattern), recursive=True) if os.path.isfile(p)
            )
            if not matches:
                raise ConfigError(f"input {spec.name}: no file matches {src}")
            if self.local:
                return _url_of(root) + "/", f"{mount}/{pattern}"
            for p in matches:
                self.uploads.append((p, s3.s3_join(dest, os.path.relpath(p, root).replace(os.sep, "/"))))
            return dest + "/", f"{mount}/{pattern}"
        if os.path.isfile(src):
            name = os.path.basename(src)
            if self.local:
                return _url_of(src), f"{mount}/{name}"
            self.uploads.append((os.path.abspath(src), s3.s3_join(dest, name)))
            return s3.s3_join(dest, name), f"{mount}/{name}"
        if os.path.isdir(src):
            if self.local:
                return _url_of(src) + "/", mount
            files = list(s3.local_files(src))
            if not files:
                raise ConfigError(f"input {spec.name}: folder {src} is empty")
            self.uploads.extend((full, s3.s3_join(dest, rel)) for full, rel in files)
            return dest + "/", mount
        raise ConfigError(f"input {spec.name}: {src} does not exist (no file, folder or glob match)")


def default_staging(program: RemoteProgram, settings: SageMakerSettings) -> str:
    """Where staged files go: ``--sagemaker-staging``, else ``_sagemaker/`` beside the first S3 output
    (the job's role already writes there), else the SageMaker default bucket of the account."""
    if settings.staging:
        return settings.staging.rstrip("/")
    for out in program.outputs:
        if s3.is_s3(out.destination):
            return s3.s3_join(out.destination, "_sagemaker")
    from embedkit.aws.session import account_id, region_name

    region = region_name(settings.region)
    bucket = f"sagemaker-{region}-{account_id(region)}"
    s3.ensure_bucket(bucket, region)
    return f"s3://{bucket}/embedkit"


def _manifest(program: RemoteProgram, resume: list[dict], args_file: bool) -> bytes:
    pythonpath = [f"deps/{k}" for k in program.dependencies]
    doc = {
        "format": MANIFEST_FORMAT,
        "program": program.program if program.program == "embedkit" else "script",
        "pythonpath": pythonpath,
        "resume": resume,
        "arguments_file": ARGUMENTS_FILE if args_file else None,
        "settings_file": SETTINGS_FILE if program.settings is not None else None,
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def prepare(program: RemoteProgram, settings: SageMakerSettings, *, local: bool = False) -> PreparedJob:
    """Resolve, plan the staging and build the spec of ``program`` (nothing is uploaded yet)."""
    from embedkit.aws.session import region_name

    base = settings.base_job_name or program.base_job_name
    name = settings.job_name or make_job_name(base)
    region = region_name(settings.region)
    staging_root = _scratch() if local else default_staging(program, settings)
    staging = staging_root if local else s3.s3_join(staging_root, name)
    resolver = _Resolver(staging, local)
    if len(program.inputs) != len({i.name for i in program.inputs}):
        raise ConfigError("two inputs share a name")
    container_paths: dict[tuple[str, str], str] = {}
    channels: list[Channel] = []
    sharded = False
    for spec in program.inputs:
        uri, path = resolver.input(spec)
        distribution = "FullyReplicated"
        if spec.shardable and settings.instance_count > 1 and settings.distribution != "FullyReplicated":
            distribution = "ShardedByS3Key"
            sharded = True
        channels.append(Channel(spec.name, uri, f"{INPUT_ROOT}/{spec.name}", distribution=distribution))
        container_paths[("input", spec.name)] = path
    code_files: dict[str, bytes | Path] = {"bootstrap.sh": BOOTSTRAP.encode()}
    for key, folder in program.dependencies.items():
        if not os.path.isdir(folder):
            raise ConfigError(f"dependency {key}: {folder} is not a folder (a Python package to ship)")
        pkg = os.path.basename(os.path.abspath(folder))
        for full, rel in s3.local_files(folder):
            if "__pycache__" not in rel.split("/"):
                code_files[f"deps/{key}/{pkg}/{rel}"] = Path(full)
        container_paths[("dependency", key)] = f"{CODE_DIR}/deps/{key}/{pkg}"
    outputs: list[OutputChannel] = []
    downloads: list[tuple[str, str]] = []
    resume_subdirs: dict[str, str] = {}
    for out in program.outputs:
        dest = out.destination
        if not s3.is_s3(dest):
            if local:
                dest = _url_of(dest)
            else:  # a stable prefix per local folder, so a rerun finds the previous state
                digest = hashlib.sha1(os.path.abspath(dest).encode()).hexdigest()[:12]
                remote = s3.s3_join(staging_root, "outputs", digest, out.name)
                downloads.append((remote + "/", os.path.abspath(out.destination)))
                dest = remote
        mode = out.upload_mode or settings.output_mode
        outputs.append(OutputChannel(out.name, dest.rstrip("/") + "/", f"{OUTPUT_ROOT}/{out.name}", mode))
        container_paths[("output", out.name)] = f"{OUTPUT_ROOT}/{out.name}"
        if out.resume_subdir:
            resume_subdirs[out.name] = out.resume_subdir
    resume = [
        {"from": f"{INPUT_ROOT}/{RESUME_PREFIX}{n}", "to": f"{OUTPUT_ROOT}/{n}/{sub}"}
        for n, sub in resume_subdirs.items()
    ]
    if program.program == "embedkit":
        head = ["embedkit"]
    else:
        if not os.path.isfile(program.program):
            raise ConfigError(f"script {program.program} does not exist")
        script_name = os.path.basename(program.program)
        code_files[f"script/{script_name}"] = Path(program.program)
        head = [f"script/{script_name}"]
    arguments = head + [
        container_paths[(a.kind, a.name)] if isinstance(a, Ref) else str(a) for a in program.arguments
    ]
    if sharded:
        arguments += program.sharded_arguments
    if program.settings is not None:
        resolved = {
            k: container_paths[(v.kind, v.name)] if isinstance(v, Ref) else v
            for k, v in program.settings.items()
        }
        if sharded:
            resolved.update(program.sharded_settings)
        code_files[SETTINGS_FILE] = (json.dumps(resolved, indent=2, sort_keys=True) + "\n").encode()
    args_file = not arguments_fit(arguments)
    if args_file:
        log.warning(
            "the job's %d arguments exceed SageMaker's limits (100 items of 256 characters): "
            "they travel in %s instead",
            len(arguments),
            ARGUMENTS_FILE,
        )
        code_files[ARGUMENTS_FILE] = json.dumps(arguments).encode()
        arguments = []
    code_files[MANIFEST] = _manifest(program, resume, args_file)
    for attr, target in (("requirements", "requirements.txt"), ("configuration_script", "configure.sh")):
        path = getattr(settings, attr)
        if path:
            if not os.path.isfile(path):
                raise ConfigError(f"--sagemaker-{attr.replace('_', '-')}: {path} does not exist")
            code_files[target] = Path(path)
    if settings.configuration_command:
        code_files["command.sh"] = (settings.configuration_command + "\n").encode()
    if not local:
        from embedkit.aws.dist import build_wheel

        wheel_dir = os.path.join(_scratch(), name)
        whl = build_wheel(wheel_dir)
        code_files[f"dist/{whl.name}"] = whl
    code_uri = (
        (s3.s3_join(staging, "code") + "/") if not local else _url_of(os.path.join(staging, "code")) + "/"
    )
    channels.insert(0, Channel(CODE_CHANNEL, code_uri, CODE_DIR))
    environment = {
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        "PYTHONUNBUFFERED": "1",
        "EMBEDKIT_SM_PYTHON": settings.python,
        **settings.environment,
    }
    spec = ProcessingJobSpec(
        job_name=name,
        role_arn=settings.role or (LOCAL_ROLE if local else ""),
        image_uri=settings.image or default_image(settings.instance, region),
        entrypoint=["bash", f"{CODE_DIR}/bootstrap.sh"],
        arguments=arguments,
        inputs=list(channels),
        outputs=outputs,
        instance_type=settings.instance,
        instance_count=settings.instance_count,
        volume_size_gb=settings.volume_size,
        max_runtime_seconds=settings.max_runtime,
        environment=environment,
        tags={
            "embedkit:program": sanitize(
                program.program if program.program == "embedkit" else os.path.basename(program.program)
            )
        },
    )
    if not local and not spec.role_arn:
        raise ConfigError(
            "no IAM role for the job: pass --sagemaker-role arn:aws:iam::<account>:role/<name>, set "
            "EMBEDKIT_SAGEMAKER_ROLE, or put role: in ~/.config/embedkit/sagemaker.yaml (the Terraform "
            "module infra/terraform/sagemaker-endpoint outputs one as role_arn)"
        )
    return PreparedJob(
        spec=spec,
        settings=settings,
        local=local,
        staging=staging,
        code_files=code_files,
        uploads=resolver.uploads,
        downloads=downloads,
        resumable=[o for o in outputs if o.name in resume_subdirs],
        resume_subdirs=resume_subdirs,
        base_inputs=list(channels),
    )


def _scratch() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="embedkit-sm-")


def attempt_spec(job: PreparedJob, attempt: int, state_exists) -> ProcessingJobSpec:
    """The spec of launch ``attempt`` (0 = first): a fresh name for retries, and a resume input for
    each output whose previous state ``state_exists(url)`` finds."""
    import dataclasses

    inputs = list(job.base_inputs)
    for out in job.resumable:
        state = out.s3_uri.rstrip("/") + "/" + job.resume_subdirs[out.name].strip("/") + "/"
        if state_exists(state):
            inputs.append(
                Channel(f"{RESUME_PREFIX}{out.name}", state, f"{INPUT_ROOT}/{RESUME_PREFIX}{out.name}")
            )
    name = job.spec.job_name if attempt == 0 else retry_name(job.spec.job_name, attempt)
    return dataclasses.replace(job.spec, job_name=name, inputs=inputs)

"""The CreateProcessingJob request, built and checked as one pure function.

:func:`build_processing_request` turns a :class:`ProcessingJobSpec` into the keyword arguments of
``create_processing_job``, refusing what SageMaker would refuse with a message naming the field.

>>> spec = ProcessingJobSpec(
...     job_name="embed-1", role_arn="arn:aws:iam::123456789012:role/sm", image_uri="img:1",
...     entrypoint=["bash", "/opt/ml/processing/input/embedkit-code/bootstrap.sh"], arguments=["embedkit"],
...     inputs=[Channel("data", "s3://b/in/", "/opt/ml/processing/input/data")],
...     outputs=[OutputChannel("output", "s3://b/out/", "/opt/ml/processing/output/output")])
>>> req = build_processing_request(spec)
>>> req["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3UploadMode"]
'Continuous'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from embedkit.aws.names import validate_job_name
from embedkit.errors import ConfigError

PROCESSING_ROOT = "/opt/ml/processing"
INPUT_ROOT = f"{PROCESSING_ROOT}/input"
OUTPUT_ROOT = f"{PROCESSING_ROOT}/output"
MAX_INPUTS = 10
MAX_OUTPUTS = 10
MAX_ARGUMENTS = 100
MAX_ARGUMENT_CHARS = 256
MAX_ENVIRONMENT = 100
MAX_ENV_CHARS = 256
MAX_RUNTIME_SECONDS = 5 * 24 * 3600  # SageMaker's ceiling for processing jobs
DISTRIBUTIONS = ("FullyReplicated", "ShardedByS3Key")
UPLOAD_MODES = ("Continuous", "EndOfJob")
INPUT_MODES = ("File", "Pipe")

_ROLE_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
_CHANNEL_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
_ENV_KEY_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class _S3Mount:
    name: str
    s3_uri: str
    local_path: str


@dataclass(frozen=True)
class Channel(_S3Mount):
    """One ProcessingInput: S3 objects under ``s3_uri`` copied to ``local_path`` in the container."""

    distribution: str = "FullyReplicated"
    mode: str = "File"


@dataclass(frozen=True)
class OutputChannel(_S3Mount):
    """One ProcessingOutput: files under ``local_path`` uploaded to ``s3_uri``."""

    upload_mode: str = "Continuous"


@dataclass
class ProcessingJobSpec:
    """Everything one processing job needs; see :func:`build_processing_request`."""

    job_name: str
    role_arn: str
    image_uri: str
    entrypoint: list[str]
    arguments: list[str]
    inputs: list[Channel] = field(default_factory=list)
    outputs: list[OutputChannel] = field(default_factory=list)
    instance_type: str = "ml.m5.xlarge"
    instance_count: int = 1
    volume_size_gb: int = 30
    max_runtime_seconds: int = 24 * 3600
    environment: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def check_arguments(arguments: list[str], what: str = "ContainerArguments") -> None:
    """Raise :class:`ConfigError` unless ``arguments`` fit SageMaker's limits."""
    if len(arguments) > MAX_ARGUMENTS:
        raise ConfigError(f"{what} has {len(arguments)} items; SageMaker accepts at most {MAX_ARGUMENTS}")
    for i, a in enumerate(arguments):
        if not isinstance(a, str):
            raise ConfigError(f"{what}[{i}] must be a string, got {type(a).__name__}")
        if len(a) > MAX_ARGUMENT_CHARS:
            raise ConfigError(
                f"{what}[{i}] is {len(a)} characters; SageMaker accepts at most {MAX_ARGUMENT_CHARS}: "
                f"{a[:60]}..."
            )


def arguments_fit(arguments: list[str]) -> bool:
    """True when ``arguments`` can travel as ContainerArguments as they are."""
    try:
        check_arguments(arguments)
    except ConfigError:
        return False
    return True


def check_environment(env: dict[str, str]) -> None:
    if len(env) > MAX_ENVIRONMENT:
        raise ConfigError(f"Environment has {len(env)} entries; SageMaker accepts at most {MAX_ENVIRONMENT}")
    for k, v in env.items():
        if not _ENV_KEY_RE.match(k) or len(k) > MAX_ENV_CHARS:
            raise ConfigError(
                f"Environment name {k!r} is not valid: use letters, digits and _, not starting with a "
                f"digit, at most {MAX_ENV_CHARS} characters"
            )
        if not isinstance(v, str) or len(v) > MAX_ENV_CHARS:
            raise ConfigError(
                f"Environment[{k!r}] must be a string of at most {MAX_ENV_CHARS} characters "
                f"(got {len(str(v))}); stage long values as a file instead"
            )


def _check_channel(kind: str, name: str, s3_uri: str, local_path: str, root: str, local: bool) -> None:
    if not _CHANNEL_RE.match(name):
        raise ConfigError(f"{kind} name {name!r} is not valid: use letters, digits and hyphens")
    if local and s3_uri.startswith("file://"):
        pass
    elif not s3_uri.startswith("s3://") or len(s3_uri) <= len("s3://"):
        raise ConfigError(f"{kind} {name!r}: S3Uri must be an s3:// URL, got {s3_uri!r}")
    if not (local_path == root or local_path.startswith(root + "/")) or ".." in local_path.split("/"):
        raise ConfigError(f"{kind} {name!r}: LocalPath must be under {root}/, got {local_path!r}")


def _check_spec(spec: ProcessingJobSpec, local: bool) -> None:
    validate_job_name(spec.job_name, "processing job name")
    if not _ROLE_RE.match(spec.role_arn or ""):
        raise ConfigError(
            f"role {spec.role_arn!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>); pass "
            f"--sagemaker-role or set EMBEDKIT_SAGEMAKER_ROLE"
        )
    if not spec.image_uri:
        raise ConfigError("no container image: pass --sagemaker-image")
    if not 1 <= spec.instance_count <= 100:
        raise ConfigError(f"instance count must be 1..100, got {spec.instance_count}")
    if not spec.instance_type.startswith("ml."):
        raise ConfigError(f"instance type must look like ml.m5.xlarge, got {spec.instance_type!r}")
    if not 1 <= spec.volume_size_gb <= 16384:
        raise ConfigError(f"volume size must be 1..16384 GB, got {spec.volume_size_gb}")
    if not 1 <= spec.max_runtime_seconds <= MAX_RUNTIME_SECONDS:
        raise ConfigError(
            f"max runtime must be 1..{MAX_RUNTIME_SECONDS} seconds (5 days), got {spec.max_runtime_seconds}"
        )
    if len(spec.inputs) > MAX_INPUTS:
        raise ConfigError(
            f"{len(spec.inputs)} inputs ({', '.join(c.name for c in spec.inputs)}); SageMaker accepts at "
            f"most {MAX_INPUTS}: put several into one S3 prefix"
        )
    if len(spec.outputs) > MAX_OUTPUTS:
        raise ConfigError(f"{len(spec.outputs)} outputs; SageMaker accepts at most {MAX_OUTPUTS}")
    check_arguments(spec.entrypoint, "ContainerEntrypoint")
    check_arguments(spec.arguments)
    check_environment(spec.environment)
    seen: set[str] = set()
    paths: set[str] = set()
    mounts = [
        ("input", c, INPUT_ROOT, {"distribution": DISTRIBUTIONS, "mode": INPUT_MODES}) for c in spec.inputs
    ]
    mounts += [("output", o, OUTPUT_ROOT, {"upload_mode": UPLOAD_MODES}) for o in spec.outputs]
    for kind, c, root, choices in mounts:
        _check_channel(kind, c.name, c.s3_uri, c.local_path, root, local)
        for attr, allowed in choices.items():
            if getattr(c, attr) not in allowed:
                raise ConfigError(f"{kind} {c.name!r}: {attr.replace('_', ' ')} must be one of {allowed}")
        if c.name in seen or c.local_path in paths:
            raise ConfigError(f"{kind} {c.name!r} repeats a channel name or LocalPath")
        seen.add(c.name)
        paths.add(c.local_path)


def build_processing_request(spec: ProcessingJobSpec, *, local: bool = False) -> dict:
    """The keyword arguments of ``create_processing_job`` for ``spec`` (validated). ``local``
    also accepts ``file://`` URIs, for ``--sagemaker-run local`` (never sent to AWS)."""
    _check_spec(spec, local)
    request: dict = {
        "ProcessingJobName": spec.job_name,
        "RoleArn": spec.role_arn,
        "AppSpecification": {
            "ImageUri": spec.image_uri,
            "ContainerEntrypoint": list(spec.entrypoint),
            "ContainerArguments": list(spec.arguments),
        },
        "ProcessingResources": {
            "ClusterConfig": {
                "InstanceCount": spec.instance_count,
                "InstanceType": spec.instance_type,
                "VolumeSizeInGB": spec.volume_size_gb,
            }
        },
        "ProcessingInputs": [
            {
                "InputName": c.name,
                "AppManaged": False,
                "S3Input": {
                    "S3Uri": c.s3_uri,
                    "LocalPath": c.local_path,
                    "S3DataType": "S3Prefix",
                    "S3InputMode": c.mode,
                    "S3DataDistributionType": c.distribution,
                    "S3CompressionType": "None",
                },
            }
            for c in spec.inputs
        ],
        "ProcessingOutputConfig": {
            "Outputs": [
                {
                    "OutputName": o.name,
                    "AppManaged": False,
                    "S3Output": {"S3Uri": o.s3_uri, "LocalPath": o.local_path, "S3UploadMode": o.upload_mode},
                }
                for o in spec.outputs
            ]
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": spec.max_runtime_seconds},
        "Environment": dict(spec.environment),
    }
    if not spec.arguments:
        del request["AppSpecification"]["ContainerArguments"]
    if not spec.outputs:
        del request["ProcessingOutputConfig"]
    if spec.tags:
        request["Tags"] = [{"Key": k, "Value": v} for k, v in spec.tags.items()]
    return request

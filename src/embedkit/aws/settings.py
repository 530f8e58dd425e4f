"""The ``--sagemaker-*`` options, shared by ``embedkit embed`` and :func:`embedkit.sagemaker.processing_main`.

Precedence: flag > ``EMBEDKIT_SAGEMAKER_<FIELD>`` > the YAML file (``--sagemaker-config``, else
``~/.config/embedkit/sagemaker.yaml``; flat ``field: value``) > ``processing_main`` defaults > built-in.

>>> s = SageMakerSettings.build({"run": "yes", "instance_count": "2"}, environ={})
>>> (s.mode, s.instance_count, s.wait)
('yes', 2, True)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from embedkit.errors import ConfigError
from embedkit.settings import Settings, load_config, parse_bool, setting

DEFAULT_CONFIG = os.path.join("~", ".config", "embedkit", "sagemaker.yaml")
DEFAULT_INSTANCE = "ml.m5.xlarge"
# The Hugging Face PyTorch DLC; account 763104351884 serves most regions.
DLC_ACCOUNT = "763104351884"
DLC_REPOSITORY = "huggingface-pytorch-inference"
DLC_TAG_GPU = "2.6.0-transformers4.49.0-gpu-py312-cu124-ubuntu22.04"
DLC_TAG_CPU = "2.6.0-transformers4.49.0-cpu-py312-ubuntu22.04"
GPU_FAMILIES = ("ml.g4dn", "ml.g5", "ml.g6", "ml.g6e", "ml.p3", "ml.p4d", "ml.p4de", "ml.p5")


def is_gpu_instance(instance_type: str) -> bool:
    """True for the GPU instance families.

    >>> is_gpu_instance("ml.g4dn.xlarge"), is_gpu_instance("ml.m5.xlarge")
    (True, False)
    """
    return instance_type.rsplit(".", 1)[0] in GPU_FAMILIES


def default_image(instance_type: str | None, region: str) -> str:
    """The Hugging Face PyTorch DLC for ``instance_type`` (GPU or CPU build; None: serverless, CPU)
    in ``region``.

    >>> default_image("ml.m5.xlarge", "eu-west-3").split("/")[1]
    'huggingface-pytorch-inference:2.6.0-transformers4.49.0-cpu-py312-ubuntu22.04'
    """
    tag = DLC_TAG_GPU if instance_type and is_gpu_instance(instance_type) else DLC_TAG_CPU
    return f"{DLC_ACCOUNT}.dkr.ecr.{region}.amazonaws.com/{DLC_REPOSITORY}:{tag}"


def parse_run_mode(value: str | bool | None) -> str:
    """``yes``, ``no`` or ``local`` from the truthy/falsy spellings processing_main scripts accept.

    >>> [parse_run_mode(v) for v in ("True", "0", "local", None)]
    ['yes', 'no', 'local', 'no']
    """
    if value is None:
        return "no"
    if str(value).strip().lower() == "local":
        return "local"
    return "yes" if parse_bool(value, "--sagemaker-run") else "no"


def parse_env_pairs(pairs: list[str] | tuple[str, ...] | str | None) -> dict[str, str]:
    """``["A=1", "B=x=y"]`` (or one comma-free string) -> ``{"A": "1", "B": "x=y"}``."""
    if not pairs:
        return {}
    if isinstance(pairs, str):
        pairs = [p for p in pairs.split(";") if p.strip()]
    out = {}
    for i, pair in enumerate(pairs):
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--sagemaker-env[{i}] must be KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out


@dataclass
class SageMakerSettings(Settings):
    """Where and how a job runs on SageMaker Processing."""

    env_prefix: ClassVar[str] = "EMBEDKIT_SAGEMAKER_"
    flag_prefix: ClassVar[str] = "sagemaker-"

    run: str = setting(
        "no",
        "yes: run as a SageMaker Processing job; local: run its container here; no",
        metavar="yes|no|local",
    )
    wait: bool = setting(True, "wait for the job, tail its CloudWatch logs, exit with its outcome")
    image: str | None = setting(None, "container image URI; default the Hugging Face PyTorch DLC")
    instance: str = setting(DEFAULT_INSTANCE, "instance type, e.g. ml.m5.xlarge (CPU), ml.g4dn.xlarge (T4)")
    instance_count: int = setting(1, "instances; >1 shards the input files by S3 key")
    volume_size: int = setting(30, "EBS volume per instance, GB (inputs are copied onto it)")
    max_runtime: int = setting(24 * 3600, "seconds before SageMaker stops the job (at most 5 days)")
    role: str | None = setting(None, "IAM role ARN the job runs as", env=("SAGEMAKER_ROLE",))
    retries: int = setting(0, "relaunch a failed job up to N times; it resumes from its output")
    requirements: str | None = setting(None, "requirements.txt to pip install in the container")
    configuration_script: str | None = setting(None, "bash script sourced in the container first")
    configuration_command: str | None = setting(None, "bash command run in the container first")
    staging: str | None = setting(None, "s3:// prefix for code and local inputs; default beside the output")
    job_name: str | None = setting(None, "exact job name; default <base>-<timestamp>-<random>")
    base_job_name: str | None = setting(None, "prefix of generated job names")
    distribution: str = setting("auto", "auto, ShardedByS3Key or FullyReplicated (the data input)")
    output_mode: str = setting("Continuous", "Continuous (parts uploaded as written) or EndOfJob")
    region: str | None = setting(None, "AWS region; default AWS_REGION / the profile's")
    python: str = setting("python3", "Python executable inside the container")
    log_poll: float = setting(5.0, "seconds between status/log polls while waiting")
    env: tuple[str, ...] = setting(
        (), "KEY=VALUE set in the container (repeat the flag)", repeat=True, metavar="KEY=VALUE"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.run = parse_run_mode(self.run)
        if isinstance(self.env, str):
            self.env = tuple(f"{k}={v}" for k, v in parse_env_pairs(self.env).items())
        self.environment = parse_env_pairs(list(self.env))
        if self.instance_count < 1:
            raise ConfigError(f"--sagemaker-instance-count must be >= 1, got {self.instance_count}")
        if self.retries < 0:
            raise ConfigError(f"--sagemaker-retries must be >= 0, got {self.retries}")
        if self.distribution not in ("auto", "ShardedByS3Key", "FullyReplicated"):
            raise ConfigError(
                f"--sagemaker-distribution must be auto, ShardedByS3Key or FullyReplicated, got {self.distribution!r}"
            )
        if self.output_mode not in ("Continuous", "EndOfJob"):
            raise ConfigError(
                f"--sagemaker-output-mode must be Continuous or EndOfJob, got {self.output_mode!r}"
            )
        if self.staging and not self.staging.startswith("s3://"):
            raise ConfigError(f"--sagemaker-staging must be an s3:// prefix, got {self.staging!r}")

    @property
    def mode(self) -> str:
        return self.run

    @classmethod
    def config_values(cls, config: str | Mapping[str, Any] | None) -> dict[str, Any]:
        """The YAML file's fields; keys may carry the flags' ``sagemaker_`` prefix."""
        data = load_config(config) if isinstance(config, str) else dict(config or {})
        origin = config if isinstance(config, str) else "SageMaker config"
        keys = {}
        for key, value in data.items():
            k = str(key).replace("-", "_")
            keys[k[len("sagemaker_") :] if k.startswith("sagemaker_") else k] = value
        if isinstance(keys.get("env"), dict):
            keys["env"] = tuple(f"{k}={v}" for k, v in keys["env"].items())
        return cls.normalize_keys(keys, origin=f"SageMaker config file {origin}")

    @classmethod
    def build(
        cls,
        options: Mapping[str, Any] | None = None,
        *,
        config: str | None = None,
        environ: Mapping[str, str] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> SageMakerSettings:
        """Settings from ``options`` (flags; None values ignored) > environment > YAML file
        (``config``, else ``EMBEDKIT_SAGEMAKER_CONFIG``, else the default file when it exists) >
        ``defaults`` (code) > built-in defaults."""
        environ = os.environ if environ is None else environ
        path = config or environ.get("EMBEDKIT_SAGEMAKER_CONFIG")
        if not path and os.path.exists(os.path.expanduser(DEFAULT_CONFIG)):
            path = os.path.expanduser(DEFAULT_CONFIG)
        return cls.resolve(options, environ=environ, config=path, defaults=defaults)


def add_arguments(parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
    """Add the ``--sagemaker-*`` flags (dest ``sagemaker_<field>``) in one argument group; ``defaults``
    (``processing_main``'s) replace the built-in ones beneath the environment and config file."""
    defaults = dict(defaults or {})
    group = parser.add_argument_group("SageMaker", "run this job as a SageMaker Processing job")
    SageMakerSettings.add_arguments(group, defaults=defaults)
    group.add_argument(
        "--sagemaker-config",
        dest="sagemaker_config",
        default=None,
        help=f"YAML file of the options above without the sagemaker- prefix (env EMBEDKIT_SAGEMAKER_CONFIG; default {DEFAULT_CONFIG} if present)",
    )
    parser.set_defaults(_sagemaker_defaults=defaults)


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> SageMakerSettings:
    """The settings the parsed ``args`` name (flags > environment > config file > code defaults)."""
    return SageMakerSettings.build(
        SageMakerSettings.flag_values(args),
        config=getattr(args, "sagemaker_config", None),
        environ=environ,
        defaults=getattr(args, "_sagemaker_defaults", None),
    )

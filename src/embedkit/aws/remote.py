"""``embedkit embed ... --sagemaker-run yes|no|local``: the batch job as a SageMaker Processing job.

The job's settings are resolved here and shipped whole (``embedkit embed --settings-json``); only
the places become channels: ``data``, a local ``model``, and the ``output`` whose ``_state/`` a
relaunch restores (docs/sagemaker.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from embedkit.aws.container import CODE_DIR, SETTINGS_FILE
from embedkit.aws.job import InputSpec, OutputSpec, Ref, RemoteProgram, prepare
from embedkit.aws.settings import SageMakerSettings
from embedkit.batch.settings import JobSettings
from embedkit.errors import ConfigError

log = logging.getLogger("embedkit.sagemaker")

STATE_SUBDIR = "_state"


def embed_program(job: JobSettings, *, cli_options: Sequence[str] = ()) -> RemoteProgram:
    """The :class:`RemoteProgram` that runs the resolved ``job`` in a container.

    ``cli_options`` are global ``embedkit`` options for the container's command line (logging:
    ``--log-level DEBUG``, ``--log-format json``); the job itself travels as settings."""
    if not job.input or not job.output:
        raise ConfigError("embed needs an input and an output (INPUT OUTPUT, or --input-path/--output-path)")
    if job.single_file:
        raise ConfigError(
            "--single-file cannot run inside a SageMaker job (hosts upload their parts as they go, so a "
            "merge there would leave parts and the merged file side by side); run without it, then "
            f"`embedkit embed {job.input} {job.output} --single-file` here: every unit is recorded, so "
            "it only merges"
        )
    if job.num_shards is not None or job.shard_index is not None:
        log.warning("--num-shards/--shard-index are ignored on SageMaker: the instances split the work")
    settings: dict[str, Any] = job.to_dict(mask_secrets=False)
    settings.update(input=Ref("input", "data"), output=Ref("output", "output"))
    settings.update(num_shards=None, shard_index=None)  # the container's resourceconfig.json decides
    inputs = [InputSpec("data", job.input, shardable=True)]
    model = _model_source(job.model)
    if model != job.model or os.path.exists(model):
        inputs.append(InputSpec("model", model))
        settings["model"] = Ref("input", "model")
    else:
        settings["model"] = model
    return RemoteProgram(
        program="embedkit",
        arguments=[*cli_options, "embed", "--settings-json", f"{CODE_DIR}/{SETTINGS_FILE}"],
        inputs=inputs,
        outputs=[OutputSpec("output", job.output, resume_subdir=STATE_SUBDIR)],
        base_job_name="embedkit-embed",
        settings=settings,
        # with ShardedByS3Key each host embeds all the files it received, writing metadata-<host>.json
        sharded_settings={"num_shards": 1},
    )


def _model_source(spec: str) -> str:
    """What the container needs to load ``spec``: the spec itself when it resolves anywhere (the
    default model ships with embedkit's dependencies; ``s3://`` is read by the job), else the local
    folder it resolves to here (a local path, or a hub id found in this machine's cache), staged."""
    from embedkit.models.resolve import DEFAULT_MODEL_ALIASES, resolve_model

    if not spec or spec.lower() in DEFAULT_MODEL_ALIASES or "://" in spec or os.path.exists(spec):
        return spec
    return str(resolve_model(spec))  # raises ModelNotFoundError saying how to provide it


def run_program(program: RemoteProgram, settings: SageMakerSettings) -> int:
    """Run ``program`` as ``settings.run`` says (``yes``: on SageMaker; ``local``: here)."""
    if settings.run == "local":
        from embedkit.aws.local import run_local

        return run_local(prepare(program, settings, local=True))
    from embedkit.aws.launcher import launch

    return launch(prepare(program, settings))


def run_embed(job: JobSettings, settings: SageMakerSettings, *, cli_options: Sequence[str] = ()) -> int:
    """Run the resolved ``job`` on SageMaker (``--sagemaker-run yes``) or in its container here
    (``local``); returns the exit code."""
    if settings.run == "no":
        raise ConfigError("run_embed needs --sagemaker-run yes or local")
    return run_program(embed_program(job, cli_options=cli_options), settings)

"""``embedkit embed ... --sagemaker-run yes|no|local``: the batch job as a SageMaker Processing job.

The embed command calls :func:`add_sagemaker_arguments` on its parser and, first thing in its run
function, :func:`maybe_run_on_sagemaker`; that returns None for ``--sagemaker-run no`` (the job runs
here as usual) and the exit code otherwise.

Remote runs resolve the job's settings here (flags, ``--config`` file and ``EMBEDKIT_*`` environment)
and send them as explicit flags, so the container runs exactly this job: the input becomes the
``data`` channel (``ShardedByS3Key`` across instances, with ``--num-shards 1`` so each host embeds
every file it received and writes ``metadata-<host>.json``), a local model the ``model`` channel,
the output the ``output`` channel (``S3UploadMode=Continuous``) whose ``_state/`` a relaunch
restores so the job resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

from embedkit.aws import settings as sm_settings
from embedkit.aws.job import InputSpec, OutputSpec, Ref, RemoteProgram, prepare
from embedkit.errors import ConfigError

log = logging.getLogger("embedkit.sagemaker")

# Settings that describe one host, or that SageMaker's layout replaces.
_HOST_FIELDS = ("input", "output", "model", "num_shards", "shard_index")
STATE_SUBDIR = "_state"


def add_sagemaker_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """Add ``--sagemaker-run`` and the other ``--sagemaker-*`` flags to ``parser``."""
    sm_settings.add_arguments(parser, defaults)
    parser.set_defaults(_sagemaker_parser=parser)


def _long_flag(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    dashed = [s for s in longs if "_" not in s]
    return (dashed or longs or action.option_strings)[0]


def _flags_for(parser: argparse.ArgumentParser, name: str, value: Any) -> list[str] | None:
    """The command-line tokens that set ``name`` to ``value`` with ``parser``, or None if none can."""
    actions = [a for a in parser._actions if a.dest == name and a.option_strings]
    for a in actions:
        if isinstance(a, argparse._StoreConstAction) and a.const == value:
            return [_long_flag(a)]
    for a in actions:
        if type(a) is argparse._StoreAction:
            if isinstance(value, list | tuple):
                value = ",".join(str(v) for v in value)
            return [_long_flag(a), str(value)]
    return None


def embed_program(args: argparse.Namespace) -> RemoteProgram:
    """The :class:`RemoteProgram` that runs the ``embed`` job ``args`` describes, in a container."""
    from embedkit.batch.settings import JobSettings
    from embedkit.commands.embed import settings_from_args

    parser: argparse.ArgumentParser = args._sagemaker_parser
    job = settings_from_args(args)
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
    arguments: list[str | Ref] = [Ref("input", "data"), Ref("output", "output")]
    inputs = [InputSpec("data", job.input, shardable=True)]
    model = _model_source(job.model)
    if model != job.model or os.path.exists(model):
        inputs.append(InputSpec("model", model))
        arguments += ["--model", Ref("input", "model")]
    else:
        arguments += ["--model", model]
    defaults = {f.name: f.default for f in dataclasses.fields(JobSettings)}
    for f in dataclasses.fields(JobSettings):
        value = getattr(job, f.name)
        if f.name in _HOST_FIELDS or value is None or value == defaults[f.name]:
            continue
        flags = _flags_for(parser, f.name, value)
        if flags is None:
            raise ConfigError(f"cannot pass {f.name}={value!r} to the SageMaker job: no flag sets it")
        arguments += flags
    level = getattr(args, "log_level", None)
    if level and str(level).upper() != "INFO":
        arguments += ["--log-level", str(level)]
    if getattr(args, "log_format", None) == "json":
        arguments += ["--log-format", "json"]
    if getattr(args, "env", None) == "dev":
        arguments += ["--env", "dev"]
    arguments += ["--sagemaker-run", "no"]
    return RemoteProgram(
        program="embedkit",
        arguments=["embed", *arguments],
        inputs=inputs,
        outputs=[OutputSpec("output", job.output, resume_subdir=STATE_SUBDIR)],
        base_job_name="embedkit-embed",
        # with ShardedByS3Key each host embeds all the files it received, writing metadata-<host>.json
        sharded_arguments=["--num-shards", "1"],
    )


def _model_source(spec: str) -> str:
    """What the container needs to load ``spec``: the spec itself when it resolves anywhere (the
    default model ships with embedkit's dependencies; ``s3://`` is read by the job), else the local
    folder it resolves to here (a local path, or a hub id found in this machine's cache), staged."""
    from embedkit.models.resolve import DEFAULT_MODEL_ALIASES, resolve_model

    if not spec or spec.lower() in DEFAULT_MODEL_ALIASES or "://" in spec or os.path.exists(spec):
        return spec
    return str(resolve_model(spec))  # raises ModelNotFoundError saying how to provide it


def run_program(program: RemoteProgram, settings: sm_settings.SageMakerSettings) -> int:
    """Run ``program`` as ``settings.run`` says (``yes``: on SageMaker; ``local``: here)."""
    if settings.run == "local":
        from embedkit.aws.local import run_local

        return run_local(prepare(program, settings, local=True))
    from embedkit.aws.launcher import launch

    return launch(prepare(program, settings))


def maybe_run_on_sagemaker(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int | None:
    """None when ``--sagemaker-run`` is falsy (run the job here); else run it on SageMaker (or its
    container locally for ``local``) and return the exit code."""
    settings = sm_settings.from_args(args)
    if settings.run == "no":
        return None
    if argv is not None:
        log.debug("sagemaker run of: embedkit %s", " ".join(argv))
    return run_program(embed_program(args), settings)

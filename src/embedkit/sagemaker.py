"""Run your own script locally or as a SageMaker Processing job, with the same flags.

Write a ``main(args)`` and hand it to :func:`processing_main` with its ``inputs``, ``outputs`` and
``dependencies``; ``--sagemaker-run yes|no|local`` chooses where it runs. The example and what each
mode does: docs/sagemaker.md, "Your own script: processing_main".
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from embedkit.aws import settings as sm_settings
from embedkit.aws.argv import rebuild_arguments
from embedkit.aws.job import InputSpec, OutputSpec, Ref, RemoteProgram
from embedkit.errors import ConfigError, EmbedkitError

__all__ = ["processing_main"]


def _flag(key: str) -> str:
    """``my_input`` -> ``--my-input``."""
    return "--" + key.replace("_", "-")


def _output_default(value: Any) -> tuple[str | None, str]:
    """(local path, remote) from ``"path"``, ``("path", "default")`` or ``{"local":..., "remote":...}``."""
    if isinstance(value, Mapping):
        return value.get("local"), value.get("remote") or "default"
    if isinstance(value, tuple | list):
        return (value[0] if value else None), (value[1] if len(value) > 1 and value[1] else "default")
    return value, "default"


def build_parser(
    *,
    description: str | None,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    dependencies: Mapping[str, str],
    additional_arguments: Sequence[Any] | None,
    argparse_callback: Callable[[argparse.ArgumentParser], Any] | None,
    defaults: Mapping[str, Any],
) -> argparse.ArgumentParser:
    """The script's parser: its paths, its own arguments and the ``--sagemaker-*`` flags."""
    parser = argparse.ArgumentParser(description=description)
    group = parser.add_argument_group("inputs, outputs and modules")

    def path(key: str, default: Any, text: str, suffix: str = "") -> None:
        group.add_argument(
            _flag(key) + suffix, dest=key + suffix.replace("-", "_"), default=default, help=text
        )

    for key, value in inputs.items():
        path(key, value, f"input {key}: local path, folder, glob or s3:// (default {value!r})")
    for key, value in outputs.items():
        local, remote = _output_default(value)
        path(key, local, f"output {key}: local folder or s3:// (default {local!r})")
        path(
            key,
            remote,
            f"where output {key} goes on S3 when run on SageMaker; default: beside the staged code",
            "-s3",
        )
    for key, value in dependencies.items():
        path(key, value, f"module folder shipped on PYTHONPATH (default {value!r})")
    for item in additional_arguments or ():
        if isinstance(item, Mapping):
            kwargs = dict(item)
            flag = kwargs.pop("dest")
            if flag.startswith("-"):
                parser.add_argument(flag, **kwargs)
            else:
                parser.add_argument(_flag(flag), dest=flag, **kwargs)
        else:
            pos, kwargs = item
            parser.add_argument(*pos, **kwargs)
    if argparse_callback is not None:
        argparse_callback(parser)
    sm_settings.add_arguments(parser, defaults)
    return parser


def _run_here(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace, inputs, outputs) -> int:
    """``--sagemaker-run no``: call ``main`` with S3 inputs downloaded and S3 outputs uploaded after."""
    from embedkit.aws import s3

    temps: list[str] = []
    uploads: list[tuple[str, str]] = []
    try:
        for key in [*inputs, *outputs]:
            value = getattr(args, key)
            if not (value and s3.is_s3(value)):
                continue
            tmp = tempfile.mkdtemp(prefix=f"embedkit-{key}-")
            temps.append(tmp)
            setattr(args, key, tmp)
            if key in outputs:
                uploads.append((tmp, value))
            else:
                s3.download_prefix(value, tmp)
                if s3.is_object(value):
                    setattr(args, key, os.path.join(tmp, value.rsplit("/", 1)[-1]))
        result = main(args)
        for folder, url in uploads:
            s3.upload_tree(folder, url)
        return int(result) if isinstance(result, int) and not isinstance(result, bool) else 0
    finally:
        for tmp in temps:
            shutil.rmtree(tmp, ignore_errors=True)


def _program(
    script: str, parser: argparse.ArgumentParser, args: argparse.Namespace, inputs, outputs, dependencies
) -> RemoteProgram:
    replace: dict[str, Any] = {}
    in_specs: list[InputSpec] = []
    out_specs: list[OutputSpec] = []
    for key in inputs:
        value = getattr(args, key)
        if value:
            channel = key.replace("_", "-")
            in_specs.append(InputSpec(channel, str(value), shardable=True))
            replace[key] = Ref("input", channel)
        else:
            replace[key] = None
    for key in outputs:
        local, remote = getattr(args, key), getattr(args, f"{key}_s3")
        dest = remote if remote and remote != "default" else local
        if not dest:
            raise ConfigError(f"output {key}: give {_flag(key)} (a local folder or s3://) or {_flag(key)}-s3")
        channel = key.replace("_", "-")
        out_specs.append(OutputSpec(channel, str(dest)))
        replace[key] = Ref("output", channel)
    deps = {}
    for key in dependencies:
        value = getattr(args, key)
        if value:
            deps[key.replace("_", "-")] = str(value)
            replace[key] = Ref("dependency", key.replace("_", "-"))
    skip = {f"{k}_s3" for k in outputs}
    arguments = rebuild_arguments(parser, args, replace=replace, skip=skip)
    return RemoteProgram(
        program=script,
        arguments=[*arguments, "--sagemaker-run", "no"],
        inputs=in_specs,
        outputs=out_specs,
        dependencies=deps,
        base_job_name=os.path.splitext(os.path.basename(script))[0],
    )


def processing_main(
    main: Callable[[argparse.Namespace], Any],
    *,
    script: str | None = None,
    description: str | None = None,
    inputs: Mapping[str, Any] | None = None,
    outputs: Mapping[str, Any] | None = None,
    dependencies: Mapping[str, str] | None = None,
    requirements: str | None = None,
    configuration_script: str | None = None,
    configuration_command: str | None = None,
    additional_arguments: Sequence[Any] | None = None,
    argparse_callback: Callable[[argparse.ArgumentParser], Any] | None = None,
    run: bool | str = False,
    wait: bool = True,
    image: str | None = None,
    instance: str | None = None,
    instance_count: int | None = None,
    role: str | None = None,
    base_job_name: str | None = None,
    volume_size: int | None = None,
    runtime_seconds: int | None = None,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse the command line and run ``main(args)`` here, on SageMaker, or in its container here.

    Keyword arguments set the defaults of the matching ``--sagemaker-*`` flags (``run`` ->
    ``--sagemaker-run``, ``runtime_seconds`` -> ``--sagemaker-max-runtime``...). ``inputs`` /
    ``outputs`` / ``dependencies`` map a key to a default path and add ``--key`` (outputs also
    ``--key-s3``). ``additional_arguments`` is a list of ``{"dest": "--flag", **kwargs}`` dicts or
    ``(args, kwargs)`` pairs for ``add_argument``. Returns ``main``'s integer result (0 otherwise);
    a failure exits with its code."""
    inputs, outputs, dependencies = dict(inputs or {}), dict(outputs or {}), dict(dependencies or {})
    script = os.path.abspath(script or inspect.getfile(main))
    defaults = {
        "run": ("yes" if run is True else "no" if run is False else run),
        "wait": wait,
        "image": image,
        "instance": instance,
        "instance_count": instance_count,
        "role": role,
        "base_job_name": base_job_name,
        "volume_size": volume_size,
        "max_runtime": runtime_seconds,
        "requirements": requirements,
        "configuration_script": configuration_script,
        "configuration_command": configuration_command,
        "env": tuple(f"{k}={v}" for k, v in (env or {}).items()) or None,
    }
    defaults = {k: v for k, v in defaults.items() if v is not None}
    parser = build_parser(
        description=description,
        inputs=inputs,
        outputs=outputs,
        dependencies=dependencies,
        additional_arguments=additional_arguments,
        argparse_callback=argparse_callback,
        defaults=defaults,
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        settings = sm_settings.from_args(args)
        if settings.run == "no":
            return _run_here(main, args, inputs, outputs)
        from embedkit.aws.remote import run_program

        return run_program(_program(script, parser, args, inputs, outputs, dependencies), settings)
    except EmbedkitError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from exc

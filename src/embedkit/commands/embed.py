"""``embedkit embed INPUT OUTPUT``: the batch job (see :mod:`embedkit.batch`).

Earlier command lines work unchanged: the spot-safe SageMaker Processing job's ``--input-path
--output-path --model --batch-size 0 --no-checkpoint`` and the img2dataset CLIP job's ``--input_dir
--output_dir --model_directory --num_workers --batch_size --max_samples --aws_region --config --env``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from embedkit.errors import ConfigError, InterruptedJobError

SUPPRESS = argparse.SUPPRESS


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of the embed job, on ``p``: one flag per :class:`~embedkit.batch.JobSettings`
    field, generated from its declaration, plus INPUT/OUTPUT, ``--config``, ``--settings-json`` and
    logging. Options default to None so that the environment and ``--config`` apply beneath them."""
    from embedkit.batch.settings import JobSettings

    p.add_argument("input_pos", nargs="?", metavar="INPUT", help="file, folder, s3:// prefix or glob")
    p.add_argument("output_pos", nargs="?", metavar="OUTPUT", help="output folder, local or s3://")
    fields = p.add_argument_group(
        "job settings", "each also an EMBEDKIT_<FIELD> variable and a --config key; flag > env > file"
    )
    JobSettings.add_arguments(fields, switches=True)
    job = p.add_argument_group("configuration and logging")
    job.add_argument("--config", help="YAML file holding any of the job settings (env and flags override it)")
    job.add_argument(
        "--settings-json",
        dest="settings_json",
        metavar="FILE",
        help="run exactly the resolved settings in FILE (JSON, as a SageMaker job receives them); "
        "no other flag, variable or file applies",
    )
    job.add_argument("--env", choices=("dev", "prod"), default=SUPPRESS, help="dev = debug logging")
    job.add_argument(
        "--log-format",
        dest="log_format",
        choices=("text", "json"),
        default=SUPPRESS,
        help="text or json log lines",
    )
    job.add_argument("--log-level", dest="log_level", default=SUPPRESS, help="DEBUG, INFO, WARNING")


def register(sub: argparse._SubParsersAction) -> None:
    from embedkit.aws import settings as sm_settings  # --sagemaker-run yes|no|local ...

    p = sub.add_parser(
        "embed",
        help="batch job: embed a dataset (parquet/jsonl/csv, local or s3://) into parquet, resumable",
        description="Embed the texts of a dataset into part-*.parquet files, exactly once, resumable. "
        "Exit codes: 0 done, 2 bad input or options, 3 model cannot be loaded, 5 storage error, "
        "6 output holds a job with other settings, 130 interrupted (state saved; rerun to resume).",
    )
    add_embed_arguments(p)
    sm_settings.add_arguments(p)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace, environ=None):
    """:class:`~embedkit.batch.JobSettings` from parsed ``embed`` arguments: flags > environment >
    ``--config`` file > defaults (or, with ``--settings-json``, exactly that file)."""
    from embedkit.batch.settings import JobSettings, load_config

    if getattr(args, "settings_json", None):
        with open(args.settings_json, encoding="utf-8") as fh:
            return JobSettings.from_json(fh.read())
    options = JobSettings.flag_values(args)
    for name in ("input", "output"):
        pos = getattr(args, f"{name}_pos", None)
        if pos and options.get(name) and options[name] != pos:
            raise ConfigError(f"{name} given twice: {pos!r} and --{name}-path {options[name]!r}")
        if pos:
            options[name] = pos
    config = load_config(args.config) if getattr(args, "config", None) else None
    if config:
        config = dict(config)
        env = config.pop("env", None)
        fmt = config.pop("log_format", config.pop("log-format", None))
        level = config.pop("log_level", config.pop("log-level", None))
        if fmt or level:
            from embedkit.logs import setup_logging

            setup_logging(
                level or getattr(args, "log_level", "INFO"), fmt or getattr(args, "log_format", "text")
            )
        if env == "dev" and not hasattr(args, "env"):
            args.env = env
    if getattr(args, "env", None) == "dev":
        logging.getLogger().setLevel(logging.DEBUG)
    return JobSettings.build(options, config=config, environ=environ)


def _cli_options(args: argparse.Namespace) -> list[str]:
    """The logging options of this run, for the same command in a container."""
    out: list[str] = []
    level = getattr(args, "log_level", None)
    if getattr(args, "env", None) == "dev":
        level = "DEBUG"
    if level and str(level).upper() != "INFO":
        out += ["--log-level", str(level)]
    if getattr(args, "log_format", None) == "json":
        out += ["--log-format", "json"]
    return out


def run(args: argparse.Namespace) -> int:
    from embedkit.aws import settings as sm_settings
    from embedkit.batch import embed_dataset

    settings = settings_from_args(args)
    if not getattr(args, "settings_json", None):  # a shipped job runs here, whatever the environment
        remote = sm_settings.from_args(args)
        if remote.run != "no":
            from embedkit.aws.remote import run_embed

            return run_embed(settings, remote, cli_options=_cli_options(args))
    try:
        summary = embed_dataset(settings=settings)
    except InterruptedJobError as exc:
        summary = getattr(exc, "summary", None)
        if summary is not None:
            print(summary.table(), file=sys.stderr)
        raise
    print(summary.table())
    return 0

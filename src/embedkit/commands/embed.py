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
    """Every option of the embed job, on ``p`` (reused by other doors, e.g. a SageMaker launcher).

    Options default to None so that ``--config`` and the environment apply underneath them."""
    p.add_argument("input_pos", nargs="?", metavar="INPUT", help="file, folder, s3:// prefix or glob")
    p.add_argument("output_pos", nargs="?", metavar="OUTPUT", help="output folder, local or s3://")
    io = p.add_argument_group("input and output")
    io.add_argument("--input-path", "--input_dir", "--input", dest="input", help="same as INPUT")
    io.add_argument("--output-path", "--output_dir", "--output", dest="output", help="same as OUTPUT")
    io.add_argument(
        "--text-column", dest="text_column", help="default: first of text, texto, caption, sentence, content"
    )
    io.add_argument("--id-column", dest="id_column", help="default: key if present, else <file>:<row>")
    io.add_argument(
        "--keep-columns", dest="keep_columns", help="comma-separated input columns copied to the output"
    )
    io.add_argument(
        "--max-samples", "--max_samples", dest="max_samples", type=int, help="only the first N rows"
    )
    io.add_argument("--dtype", choices=("float32", "float16"), help="embedding dtype in the output (float32)")
    io.add_argument(
        "--single-file",
        dest="single_file",
        action="store_const",
        const=True,
        help="merge into embeddings.parquet when complete",
    )
    io.add_argument("--aws-region", "--aws_region", dest="aws_region", help="S3 region")
    img = p.add_argument_group("images (img2dataset shards and URL lists, with a CLIP model)")
    img.add_argument(
        "--modality", choices=("auto", "text", "image"), help="auto (default): detected from the data"
    )
    img.add_argument(
        "--embed-captions",
        dest="embed_captions",
        action="store_const",
        const=True,
        help="also embed each caption with the CLIP text tower (caption_embedding column)",
    )
    img.add_argument("--fetch-workers", dest="fetch_workers", type=int, help="URLs fetched at once (16)")
    img.add_argument("--fetch-timeout", dest="fetch_timeout", type=float, help="seconds per fetch try (10)")
    img.add_argument("--fetch-retries", dest="fetch_retries", type=int, help="retries on timeout/429/5xx (2)")
    img.add_argument(
        "--max-image-bytes", dest="max_image_bytes", type=int, help="reject larger images (20 MiB)"
    )
    eng = p.add_argument_group("model and engine")
    eng.add_argument(
        "--model",
        "--model_directory",
        "-m",
        dest="model",
        help="default, a local dir, model.tar.gz, s3://...",
    )
    eng.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    eng.add_argument("--precision", help="fp32 (exact), bf16, fp16 (GPU), int8 (CPU)")
    eng.add_argument(
        "--backend", help="auto (ONNX Runtime for the small batches where it measures faster), torch, onnx"
    )
    eng.add_argument(
        "--max-batch-tokens", dest="max_batch_tokens", type=int, help="padded tokens per batch (0 = auto)"
    )
    eng.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=int, help="cap on texts per batch (0 = auto)"
    )
    eng.add_argument("--dimensions", type=int, help="Matryoshka: keep the first N components")
    eng.add_argument(
        "--normalize",
        dest="normalize",
        action="store_const",
        const=True,
        help="L2-normalise (default: the model's config)",
    )
    eng.add_argument(
        "--no-normalize", dest="normalize", action="store_const", const=False, help="do not L2-normalise"
    )
    eng.add_argument(
        "--no-truncate",
        dest="truncate",
        action="store_const",
        const=False,
        help="reject over-long texts instead of truncating them",
    )
    eng.add_argument("--pooling", help="override pooling: mean, cls, max, lasttoken")
    eng.add_argument("--prompt-name", dest="prompt_name", help="prompt from the model's config to prepend")
    eng.add_argument(
        "--num-workers",
        "--num_workers",
        dest="num_workers",
        type=int,
        help="--engine ray: actors (default one per GPU, else one per node); local engine: logged only",
    )
    ray = p.add_argument_group("scale out (--engine ray)")
    ray.add_argument(
        "--engine",
        choices=("local", "ray"),
        help="local: one engine in this process (default); ray: an actor pool on Ray Data",
    )
    ray.add_argument(
        "--ray-address",
        dest="ray_address",
        help="Ray cluster to join (also RAY_ADDRESS); unset: start a local Ray and stop it at the end",
    )
    ray.add_argument(
        "--cpus-per-worker",
        dest="cpus_per_worker",
        type=float,
        help="CPUs each actor reserves (default: its share of the cores, leaving some free)",
    )
    ray.add_argument(
        "--gpus-per-worker", dest="gpus_per_worker", type=float, help="GPUs each actor reserves (default 0)"
    )
    job = p.add_argument_group("job")
    job.add_argument(
        "--no-resume",
        "--no-checkpoint",
        dest="resume",
        action="store_const",
        const=False,
        help="redo units recorded by an earlier run",
    )
    job.add_argument(
        "--overwrite", action="store_const", const=True, help="replace a job made with other settings"
    )
    job.add_argument(
        "--num-shards",
        dest="num_shards",
        type=int,
        help="hosts splitting the units (default: resourceconfig.json, else 1)",
    )
    job.add_argument("--shard-index", dest="shard_index", type=int, help="this host's index, 0-based")
    job.add_argument(
        "--fail-fast",
        dest="fail_fast",
        action="store_const",
        const=True,
        help="stop at the first rejected row or file",
    )
    job.add_argument("--unit-rows", dest="unit_rows", type=int, help="rows per unit of work (50000)")
    job.add_argument(
        "--progress",
        choices=("auto", "bar", "log", "none"),
        help="auto: a bar on a terminal, log lines elsewhere",
    )
    job.add_argument(
        "--log-every", dest="log_every", type=float, help="seconds between progress log lines (30)"
    )
    job.add_argument("--config", help="YAML file holding any of these options (flags override it)")
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
    p = sub.add_parser(
        "embed",
        help="batch job: embed a dataset (parquet/jsonl/csv, local or s3://) into parquet, resumable",
        description="Embed the texts of a dataset into part-*.parquet files, exactly once, resumable. "
        "Exit codes: 0 done, 2 bad input or options, 3 model cannot be loaded, 5 storage error, "
        "6 output holds a job with other settings, 130 interrupted (state saved; rerun to resume).",
    )
    add_embed_arguments(p)
    from embedkit.aws.remote import add_sagemaker_arguments  # --sagemaker-run yes|no|local ...

    add_sagemaker_arguments(p)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    """:class:`~embedkit.batch.JobSettings` from parsed ``embed`` arguments (and their ``--config``)."""
    from embedkit.batch.settings import JobSettings, load_config

    options = {k: getattr(args, k) for k in JobSettings.field_names() if getattr(args, k, None) is not None}
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
    return JobSettings.build(options, config=config)


def run(args: argparse.Namespace) -> int:
    from embedkit.aws.remote import maybe_run_on_sagemaker
    from embedkit.batch import embed_dataset

    remote = maybe_run_on_sagemaker(args, sys.argv[1:])  # None: --sagemaker-run no, run here
    if remote is not None:
        return remote
    settings = settings_from_args(args)
    try:
        summary = embed_dataset(settings=settings)
    except InterruptedJobError as exc:
        summary = getattr(exc, "summary", None)
        if summary is not None:
            print(summary.table(), file=sys.stderr)
        raise
    print(summary.table())
    return 0

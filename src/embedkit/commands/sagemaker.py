"""``embedkit sagemaker package-model|deploy|describe|delete|invoke``: SageMaker endpoints via boto3.

    embedkit sagemaker package-model default s3://bucket/models/minilm/model.tar.gz
    embedkit sagemaker deploy my-embeddings --image hf --model sentence-transformers/all-MiniLM-L6-v2 \\
        --serverless --memory 3072 --max-concurrency 2 --role arn:aws:iam::123456789012:role/sm
    embedkit sagemaker invoke my-embeddings "hello world"
    embedkit sagemaker delete my-embeddings

Each prints one JSON object. Exit codes: 0 ok, 1 AWS refused or the endpoint failed, 2 bad options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from embedkit.errors import InputError


def _printed(action: Callable[[argparse.Namespace], object]) -> Callable[[argparse.Namespace], int]:
    """``action`` as a subcommand: its result printed as one JSON object, exit code 0."""

    def run(args: argparse.Namespace) -> int:
        json.dump(action(args), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0

    return run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sagemaker", help="SageMaker endpoints: package a model, deploy, describe, delete, invoke"
    )
    sm = p.add_subparsers(dest="sagemaker_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--region", default=None, help="AWS region (default AWS_REGION / the profile's)")

    pk = sm.add_parser(
        "package-model", parents=[common], help="write a model as SageMaker's model.tar.gz (local or s3://)"
    )
    pk.add_argument("model", help="default, a local model folder, a model.tar.gz, s3://...")
    pk.add_argument(
        "destination", help="where the archive goes: ./model.tar.gz or s3://bucket/key/model.tar.gz"
    )
    pk.add_argument("--inference", default=None, help="a custom handler, shipped as code/inference.py")
    pk.add_argument("--requirements", default=None, help="shipped as code/requirements.txt")
    pk.add_argument("--code-dir", default=None, help="a folder shipped as code/")
    pk.add_argument(
        "--no-bake-graph",
        dest="bake_graph",
        action="store_false",
        help="leave out the ONNX graph (baked in by default, as .embedkit/graphs/, for fast cold starts)",
    )
    pk.set_defaults(func=_printed(_package))

    dp = sm.add_parser(
        "deploy", parents=[common], help="create (or update) an endpoint and wait until it is InService"
    )
    dp.add_argument("name", help="endpoint name (letters, digits, hyphens)")
    dp.add_argument(
        "--image",
        default="embedkit",
        help="embedkit (this project's image; give --image-uri), hf (the Hugging Face DLC with HF_MODEL_ID/"
        "HF_TASK), or an image URI",
    )
    dp.add_argument(
        "--image-uri",
        default=os.environ.get("EMBEDKIT_IMAGE_URI"),
        help="ECR URI of the embedkit image (env EMBEDKIT_IMAGE_URI)",
    )
    dp.add_argument("--model-data", default=None, help="s3://.../model.tar.gz from package-model")
    dp.add_argument(
        "--model", default=None, help="model id when there is no --model-data (HF_MODEL_ID / EMBEDKIT_MODEL)"
    )
    dp.add_argument("--hf-task", default="feature-extraction", help="HF_TASK for --image hf")
    mode = dp.add_mutually_exclusive_group()
    mode.add_argument("--serverless", action="store_true", help="serverless inference (the default)")
    mode.add_argument(
        "--instance-type", default=None, help="real-time endpoint on instances, e.g. ml.m5.xlarge"
    )
    dp.add_argument("--memory", type=int, default=3072, help="serverless memory, MB: 1024..6144 by 1024")
    dp.add_argument("--max-concurrency", type=int, default=2, help="serverless concurrent invocations")
    dp.add_argument("--instance-count", type=int, default=1, help="instances of a real-time endpoint")
    dp.add_argument(
        "--role",
        default=os.environ.get("EMBEDKIT_SAGEMAKER_ROLE") or os.environ.get("SAGEMAKER_ROLE"),
        help="execution role ARN (env EMBEDKIT_SAGEMAKER_ROLE)",
    )
    dp.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="container environment")
    dp.add_argument(
        "--no-wait", dest="wait", action="store_false", help="return once the endpoint is Creating"
    )
    dp.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for InService")
    dp.add_argument("--poll", type=float, default=15.0, help="seconds between status checks")
    dp.set_defaults(func=_printed(_deploy))

    ds = sm.add_parser(
        "describe",
        parents=[common],
        help="status, variants, image, model data and environment of an endpoint",
    )
    ds.add_argument("name")
    ds.set_defaults(func=_printed(_describe))

    dl = sm.add_parser(
        "delete", parents=[common], help="delete an endpoint with its endpoint config and model"
    )
    dl.add_argument("name")
    dl.add_argument("--keep-model", action="store_true", help="delete only the endpoint")
    dl.set_defaults(func=_printed(_delete))

    iv = sm.add_parser(
        "invoke", parents=[common], help='send {"inputs": ...} to an endpoint and print its answer'
    )
    iv.add_argument("name")
    iv.add_argument("texts", nargs="*", help="texts; none = one per line on stdin")
    iv.add_argument("--normalize", choices=("true", "false"), default=None, help="parameters.normalize")
    iv.add_argument("--dimensions", type=int, default=None, help="parameters.dimensions")
    iv.set_defaults(func=_printed(_invoke))


def _package(args: argparse.Namespace) -> dict:
    from embedkit.aws.package import package_model

    options = {k: getattr(args, k) for k in ("inference", "requirements", "code_dir", "bake_graph")}
    return package_model(args.model, args.destination, **options)


def _deploy(args: argparse.Namespace) -> dict:
    from embedkit.aws.endpoints import DeploySpec, deploy
    from embedkit.aws.settings import parse_env_pairs

    spec = DeploySpec(
        name=args.name,
        role_arn=args.role or "",
        image=args.image,
        image_uri=args.image_uri,
        model_data=args.model_data,
        model_id=args.model,
        hf_task=args.hf_task,
        serverless=args.instance_type is None,
        memory_mb=args.memory,
        max_concurrency=args.max_concurrency,
        instance_type=args.instance_type or "ml.m5.xlarge",
        instance_count=args.instance_count,
        environment=parse_env_pairs(args.env),
        region=args.region,
    )
    return deploy(spec, wait=args.wait, timeout=args.timeout, poll_seconds=args.poll)


def _describe(args: argparse.Namespace) -> dict:
    from embedkit.aws.endpoints import describe

    return describe(args.name, region=args.region)


def _delete(args: argparse.Namespace) -> dict:
    from embedkit.aws.endpoints import delete

    return delete(args.name, keep_model=args.keep_model, region=args.region)


def _invoke(args: argparse.Namespace) -> dict:
    from embedkit.aws.endpoints import invoke

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise InputError("no texts to send: give them as arguments or one per line on stdin")
    params: dict = {}
    if args.normalize is not None:
        params["normalize"] = args.normalize == "true"
    if args.dimensions is not None:
        params["dimensions"] = args.dimensions
    body, ctype = invoke(
        args.name, texts[0] if len(texts) == 1 else texts, parameters=params, region=args.region
    )
    return {"endpoint": args.name, "content_type": ctype, "response": body}

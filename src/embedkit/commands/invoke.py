"""``embedkit invoke``: smoke-test an endpoint with the same client applications use.

    embedkit invoke "geladeira frost free" --endpoint-url http://localhost:8080
    embedkit invoke "hello" --sagemaker-endpoint my-endpoint --region us-east-1
    EMBEDKIT_ENDPOINT_URL=http://localhost:8080 embedkit invoke --contract search_term "hello"

Prints one JSON object: where the request went, the dimension, each vector's norm and the vectors.
Exit codes: 0 ok, 1 the endpoint refused the request, 2 bad configuration or input, 69 unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from embedkit.client.settings import ClientSettings
from embedkit.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "invoke",
        help="embed texts through a running endpoint (HTTP or SageMaker) and print the vectors",
        description="Send texts to an endpoint with embedkit's client; the transport comes from "
        "--endpoint-url or --sagemaker-endpoint (or EMBEDKIT_ENDPOINT_URL / EMBEDKIT_SAGEMAKER_ENDPOINT).",
    )
    p.add_argument("texts", nargs="*", help="texts to embed; none = one text per line from stdin")
    ClientSettings.add_arguments(p)
    p.add_argument("--dimensions", type=int, default=None, help="Matryoshka: ask for the first N components")
    p.add_argument(
        "--normalize", choices=("true", "false"), default=None, help="ask the server to L2-normalise"
    )
    p.add_argument("--truncate", choices=("true", "false"), default=None, help="long-input policy to ask for")
    p.add_argument("--prompt-name", default=None, help="a prompt defined by the server's model")
    p.add_argument("--no-vectors", action="store_true", help="print the summary only, not the vectors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from embedkit.client import EmbeddingClient
    from embedkit.client.contracts import OPTION_NAMES

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise InputError("no texts to embed: give them as arguments or one per line on stdin")
    settings = ClientSettings.from_args(args)
    # A transport named on the command line replaces the other one the environment may name.
    if args.endpoint_url:
        settings.sagemaker_endpoint = args.sagemaker_endpoint
    elif args.sagemaker_endpoint:
        settings.endpoint_url = None
    options = {k: getattr(args, k) for k in OPTION_NAMES if getattr(args, k) is not None}
    for k in ("normalize", "truncate"):
        if k in options:
            options[k] = options[k] == "true"
    with EmbeddingClient(settings) as client:
        started = time.perf_counter()
        vecs = client.embed(texts, **options)
        seconds = time.perf_counter() - started
        out = {
            "transport": client.transport_name,
            "target": client.target,
            "contract": settings.contract,
            "count": int(vecs.shape[0]),
            "dimension": int(vecs.shape[1]) if vecs.size else 0,
            "seconds": round(seconds, 4),
            "requests": client.stats.requests,
            "retries": client.stats.retries,
            "norms": [round(float(x), 6) for x in (vecs**2).sum(axis=1) ** 0.5],
        }
        if not args.no_vectors:
            out["embeddings"] = vecs.tolist()
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0

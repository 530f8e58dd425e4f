"""``embedkit encode``: embed texts from arguments or stdin (one per line) and print JSON vectors."""

from __future__ import annotations

import argparse
import json
import sys

from embedkit.settings import EngineSettings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode", help="embed texts given as arguments (or stdin lines) and print vectors as JSON"
    )
    p.add_argument("texts", nargs="*", help="texts to embed; none = read one text per line from stdin")
    EngineSettings.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    from embedkit.engine import build_embedder

    embedder = build_embedder(EngineSettings.from_args(args))
    vecs = embedder.encode(texts)
    json.dump(
        {"model": embedder.model.name, "dimension": embedder.dimension, "embeddings": vecs.tolist()},
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0

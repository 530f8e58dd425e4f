"""``embedkit search OUTPUT "query" [-k 5] [--mode dense|sparse|colbert|hybrid]``: top-k of a job's
output for one or more queries."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="top-k nearest rows of a job's output to a query (uses the export when present)"
    )
    p.add_argument("output", metavar="OUTPUT", help="the output folder of `embedkit embed` (local or s3://)")
    p.add_argument("queries", nargs="+", metavar="QUERY", help="one or more query texts")
    p.add_argument("-k", type=int, default=5, help="results per query (5)")
    p.add_argument("--model", default=None, help="query model (default: the one recorded in metadata.json)")
    p.add_argument(
        "--prompt-name", default=None, help="prompt for queries, e.g. query (models that define one)"
    )
    p.add_argument(
        "--mode",
        choices=("dense", "sparse", "colbert", "hybrid"),
        default="dense",
        help="score by the dense vectors (default), BGE-M3's lexical weights (sparse), its ColBERT "
        "vectors, or hybrid: their weighted sum over the sum of the weights; the job must have "
        "written the outputs the mode reads (embedkit embed --outputs)",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="D,S,C",
        help="--mode hybrid: weights of the dense, sparse and ColBERT scores (0.4,0.2,0.4); "
        "a 0 leaves that output out",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a list")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from embedkit.batch.search import search_output
    from embedkit.errors import ConfigError

    if args.k < 1:
        raise ConfigError(f"-k must be >= 1, got {args.k}")
    results = search_output(
        args.output,
        args.queries,
        k=args.k,
        model=args.model,
        prompt_name=args.prompt_name,
        mode=args.mode,
        weights=args.weights,
    )
    if args.json:
        print(
            json.dumps(
                [
                    {"query": q, "hits": [h.to_dict() for h in hits]}
                    for q, hits in zip(args.queries, results, strict=True)
                ]
            )
        )
        return 0
    for query, hits in zip(args.queries, results, strict=True):
        print(f"query: {query}")
        for h in hits:
            text = f"  {h.text[:110]}" if h.text else ""
            print(f"  {h.rank}. {h.score:.3f}  [{h.id}]{text}")
    return 0

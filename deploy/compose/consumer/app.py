"""Example consumer: application code that runs unchanged against the local stack and SageMaker.

It embeds a small product catalogue and a few search queries, then prints the best match of each
query. Nothing here names a transport; the environment does:

    EMBEDKIT_ENDPOINT_URL=http://sagemaker-local:8080                     # local stack (compose)
    EMBEDKIT_SAGEMAKER_ENDPOINT=alex-embedding-endpoint AWS_REGION=us-east-1  # the real endpoint

    python app.py                       # default queries, human-readable lines
    python app.py "tv grande" --json    # your queries; one JSON object with the vectors
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from embedkit.client import EmbeddingClient

CATALOG = [
    "geladeira frost free 375 litros inox",
    "fogão 4 bocas com acendimento automático",
    "smart tv 50 polegadas 4k",
    "máquina de lavar roupas 12 kg",
    "notebook 16 GB RAM SSD 512 GB",
    "cafeteira elétrica 30 xícaras",
]
QUERIES = ["geladeira frost free", "televisão grande para a sala", "computador portátil"]


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("queries", nargs="*", default=QUERIES, help="search queries")
    parser.add_argument("--json", action="store_true", help="print one JSON object, vectors included")
    args = parser.parse_args(argv)

    with EmbeddingClient() as client:  # configured by EMBEDKIT_* environment variables only
        catalog = client.embed(CATALOG)
        queries = client.embed(args.queries)
        transport, target = client.transport_name, client.target

    scores = unit(queries) @ unit(catalog).T
    best = [
        {"query": q, "match": CATALOG[int(np.argmax(s))], "score": round(float(np.max(s)), 4)}
        for q, s in zip(args.queries, scores, strict=True)
    ]
    if args.json:
        out = {
            "transport": transport,
            "dimension": int(catalog.shape[1]),
            "results": best,
            "catalog": catalog.tolist(),
            "queries": queries.tolist(),
        }
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"embedded {len(CATALOG)} products + {len(args.queries)} queries via {transport} ({target})")
        for b in best:
            print(f"  {b['query']!r:40} -> {b['match']!r} ({b['score']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

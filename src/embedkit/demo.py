"""``make demo``: embed the bundled sample (sentences from the Python language reference) with the
default model, then answer a few semantic-search queries with the top-3 matches and their scores."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embedkit import Embedder

SAMPLE_DIR = Path(__file__).parent / "data" / "sample"
QUERIES = (
    "how do I catch an error and handle it",
    "loop over the items of a list",
    "what happens when a function returns a value",
    "import a module from a package",
)


def main() -> int:
    table = pq.read_table(sorted(SAMPLE_DIR.glob("*.parquet")))
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    emb = Embedder("default")
    t0 = time.perf_counter()
    vecs = emb.encode(texts)
    dt = time.perf_counter() - t0
    print(
        f"embedded {len(texts)} sentences with {emb.model.name} ({emb.dimension} dims, {emb.precision}) "
        f"in {dt:.2f}s: {len(texts) / dt:.0f} texts/s, {emb.stats.tokens / dt:.0f} tokens/s"
    )
    q = emb.encode(list(QUERIES))
    scores = q @ vecs.T
    for query, row in zip(QUERIES, scores, strict=True):
        print(f"\nquery: {query}")
        for rank, i in enumerate(np.argsort(-row)[:3], 1):
            print(f"  {rank}. {row[i]:.3f}  [{ids[i]}] {texts[i][:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

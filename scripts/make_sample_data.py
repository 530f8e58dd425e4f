"""Rebuild the bundled sample dataset (src/embedkit/data/sample/) from Python's own documentation.

Run with the project's venv: .venv/bin/python scripts/make_sample_data.py
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from embedkit.corpus import doc_sentences

OUT = Path(__file__).resolve().parents[1] / "src" / "embedkit" / "data" / "sample"


def main() -> None:
    sentences = doc_sentences(limit=600)
    OUT.mkdir(parents=True, exist_ok=True)
    half = len(sentences) // 2
    for part, chunk in enumerate((sentences[:half], sentences[half:])):
        ids = [f"doc-{part * half + i:05d}" for i in range(len(chunk))]
        table = pa.table({"id": ids, "text": chunk, "source": ["python-language-reference"] * len(chunk)})
        pq.write_table(table, OUT / f"sentences-{part:02d}.parquet")
    print(f"wrote {len(sentences)} sentences to {OUT}")


if __name__ == "__main__":
    main()

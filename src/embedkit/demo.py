"""``make demo``: the whole path a newcomer will use, on the bundled sample (600 sentences from the
Python language reference, two Parquet files) with the default model:

1. ``embedkit embed`` the sample into ``demo-output/`` (part files, rejects, metadata.json),
2. ``embedkit export`` it as ``.npy`` files and a FAISS index (numpy when faiss is absent),
3. ``embedkit search`` it with a few questions.

Each step prints the command it runs, so it can be copied. Reruns start over (``--overwrite``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from embedkit.cli import main as cli

SAMPLE_DIR = Path(__file__).parent / "data" / "sample"
QUERIES = (
    "how do I catch an error and handle it",
    "loop over the items of a list",
    "what happens when a function returns a value",
    "import a module from a package",
)


def _run(argv: list[str]) -> None:
    shown = " ".join(f'"{a}"' if " " in a else a for a in argv)
    print(f"\n$ embedkit {shown}", flush=True)
    rc = cli(argv)
    if rc:
        raise SystemExit(rc)


def main(out: str | None = None) -> int:
    out = out or os.environ.get("EMBEDKIT_DEMO_OUTPUT", "demo-output")
    sample = (
        os.path.relpath(SAMPLE_DIR) if not os.path.relpath(SAMPLE_DIR).startswith("..") else str(SAMPLE_DIR)
    )
    _run(
        [
            "--log-level",
            "WARNING",
            "embed",
            sample,
            out,
            "--id-column",
            "id",
            "--keep-columns",
            "text",
            "--overwrite",
            "--progress",
            "none",
        ]
    )
    fmt = "faiss" if importlib.util.find_spec("faiss") else "npy"
    _run(["--log-level", "WARNING", "export", out, "--format", fmt])
    _run(["--log-level", "WARNING", "search", out, *QUERIES, "-k", "3"])
    print(
        f"\nread the vectors with any Parquet reader, e.g. DuckDB: SELECT id, embedding FROM '{out}/part-*.parquet'"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))

"""The benchmark corpus: real, mixed-length text that ships with Python itself.

Short texts are first lines of standard-library docstrings (~15 tokens each); long texts are
~380-word passages of the language reference (~500 tokens, cut to the model's 256). Both come from
:mod:`embedkit.corpus`, so nothing is downloaded and nothing is generated words. The two are mixed
by a seeded shuffle, so every run and every config sees the same texts in the same order.

>>> texts = build_corpus(n_short=10, n_long=2)
>>> len(texts)
12
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

# embedkit is imported inside the functions: importing it sets OMP_WAIT_POLICY for the process
# (and its children), and the baseline's worker must start with the user's own environment.

FULL_SHORT = 3000
FULL_LONG = 0  # 0 = every passage (~170)
QUICK_SHORT = 400
QUICK_LONG = 24
SEED = 20240


def build_corpus(n_short: int = FULL_SHORT, n_long: int = FULL_LONG, seed: int = SEED) -> list[str]:
    """``n_short`` docstring summaries plus ``n_long`` passages (0 = all), shuffled with ``seed``."""
    from embedkit.corpus import doc_passages

    short = docstring_summaries()
    if n_short > len(short):
        raise ValueError(f"only {len(short)} short texts are available, {n_short} asked for")
    passages = doc_passages()
    if n_long > len(passages):
        raise ValueError(f"only {len(passages)} passages are available, {n_long} asked for")
    texts = short[:n_short] + (passages[:n_long] if n_long else passages)
    random.Random(seed).shuffle(texts)
    return texts


def docstring_summaries() -> list[str]:
    """The short texts: first lines of standard-library docstrings (~3,700)."""
    from embedkit.corpus import docstring_summaries as summaries

    return summaries()


def cycled_short(n: int, pool: list[str] | None = None) -> Iterator[str]:
    """``n`` short texts, cycling through the docstring summaries, produced lazily (no list of n)."""
    return itertools.islice(itertools.cycle(pool or docstring_summaries()), n)


def save(texts: list[str], path: Path) -> Path:
    """Write the corpus once so every worker process reads exactly the same texts."""
    path.write_text(json.dumps(texts), encoding="utf-8")
    return path


def load(path: str | Path) -> list[str]:
    return json.loads(Path(path).read_text(encoding="utf-8"))

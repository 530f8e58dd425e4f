"""embedkit: text (and image) embeddings the same way everywhere.

>>> import embedkit
>>> emb = embedkit.Embedder("default")
>>> emb.encode(["hello world"]).shape
(1, 384)

The engine (and torch) load on first use of :class:`Embedder`, so ``import embedkit.client`` in a
consumer application stays light. Importing embedkit sets ``OMP_WAIT_POLICY=PASSIVE`` and caps
oneDNN's kernel caches unless those variables are already set (see below).
"""

from __future__ import annotations

import importlib
import os

# OpenMP threads that spin after each parallel region starve embedkit's own helper threads
# (padding, reading, writing, the server's event loop) on small machines: measured here, a
# one-text encode took 350-660 ms with spinning and 12-45 ms without, and bulk throughput rose
# 1.8x. Must be set before torch loads; set OMP_WAIT_POLICY=ACTIVE yourself to opt out.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# oneDNN (and PyTorch's ideep layer over it) keep a compiled kernel per distinct matrix shape, up to
# 1024 each by default, and token-budget batches have a different row count almost every time: a
# long encode_iter grew by ~3 KiB per text until the caches filled (peak RSS 1.73x from 20k to 200k
# texts). With 64 entries each a batch job still climbed ~350 MB over its first 15k rows before
# levelling off (Zen4), and ~210 MB over 8k texts on an AVX2 EPYC. The engine now pads widths to
# multiples of 8 (few distinct shapes, so a small cache hits), and 8 entries each keep RSS flat from
# the first thousand texts (measured: 610-690 MB over 8k texts, against 650 -> 864 MB with 64) at no
# measurable speed cost; 4 entries measured flat in the same wall time on Zen4 too. Must be set before
# torch runs its first oneDNN kernel; set the variables yourself to choose other sizes.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
os.environ.setdefault("LRU_CACHE_CAPACITY", "8")
from typing import TYPE_CHECKING, Any

from embedkit.errors import EmbedkitError

__version__ = "0.1.0"

_LAZY = {
    "Embedder": "embedkit.engine",
    "EncodeResult": "embedkit.engine",
    "ModelInfo": "embedkit.models",
    "resolve_model": "embedkit.models",
}

if TYPE_CHECKING:  # pragma: no cover
    from embedkit.engine import Embedder, EncodeResult
    from embedkit.models import ModelInfo, resolve_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'embedkit' has no attribute {name!r}")


__all__ = ["Embedder", "EmbedkitError", "EncodeResult", "ModelInfo", "__version__", "resolve_model"]

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
# texts). With 64 entries a batch job still climbed ~350 MB over its first 15k rows (Zen4) and
# ~210 MB over 8k texts (AVX2 EPYC). 16 entries each level off within the first 2k texts (659 -> 729 MB,
# then 690-704 MB to 8k) at a speed within run-to-run noise of 64 (24.5 s vs 23.8 s on the bench
# corpus, interleaved runs); 8 entries cost ~5%, and padding widths to multiples of 8 to share kernels
# cost another ~5%. Must be set before torch runs its first oneDNN kernel; set the variables
# yourself to choose other sizes.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
os.environ.setdefault("LRU_CACHE_CAPACITY", "16")
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

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

# Set before torch loads (docs/backends.md, "CPU threads and memory"): spinning OpenMP threads starve
# embedkit's helper threads on small machines, and oneDNN's per-shape kernel caches grow with every
# new batch shape unless capped. Set the variables yourself to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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

"""embedkit: text (and image) embeddings the same way everywhere.

>>> import embedkit
>>> emb = embedkit.Embedder("default")
>>> emb.encode(["hello world"]).shape
(1, 384)
"""

from embedkit.engine import Embedder, EncodeResult
from embedkit.errors import EmbedkitError
from embedkit.models import ModelInfo, resolve_model

__version__ = "0.1.0"

__all__ = ["Embedder", "EmbedkitError", "EncodeResult", "ModelInfo", "__version__", "resolve_model"]

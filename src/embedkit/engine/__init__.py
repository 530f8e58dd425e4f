"""The embedding engine: tokenise, token-budget batching, precision/device (the model runner), encode.

Knows nothing of HTTP, S3 or files.
"""

from embedkit.engine.batching import pad_batch, plan_batches
from embedkit.engine.embedder import Embedder, EncodeResult
from embedkit.engine.runner import EngineStats, ModelRunner
from embedkit.engine.tokenize import Tokenized, validate_texts

__all__ = [
    "Embedder",
    "EncodeResult",
    "EngineStats",
    "ModelRunner",
    "Tokenized",
    "pad_batch",
    "plan_batches",
    "validate_texts",
]

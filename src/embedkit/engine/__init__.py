"""The embedding engine: tokenise, token-budget batching, precision/device (the model runner), encode.

Knows nothing of HTTP, S3 or files, and reads no environment variable: its settings come in as
arguments (:func:`build_embedder` from an :class:`~embedkit.settings.EngineSettings`).
"""

from embedkit.engine.batching import pad_batch, plan_batches
from embedkit.engine.embedder import Embedder, EncodeResult
from embedkit.engine.factory import build_embedder
from embedkit.engine.runner import EngineStats, ModelRunner
from embedkit.engine.tokenize import Tokenized, validate_texts

__all__ = [
    "Embedder",
    "EncodeResult",
    "EngineStats",
    "ModelRunner",
    "Tokenized",
    "build_embedder",
    "pad_batch",
    "plan_batches",
    "validate_texts",
]

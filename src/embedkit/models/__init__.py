"""Resolve, load and describe embedding models (no downloads at run time)."""

from embedkit.models.info import ModelInfo, content_hash
from embedkit.models.resolve import DEFAULT_MODEL_ID, cache_dir, default_model_path, resolve_model
from embedkit.models.text import TextModel, load_text_model

__all__ = [
    "DEFAULT_MODEL_ID",
    "ModelInfo",
    "TextModel",
    "cache_dir",
    "content_hash",
    "default_model_path",
    "load_text_model",
    "resolve_model",
]

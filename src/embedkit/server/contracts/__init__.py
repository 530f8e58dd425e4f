"""One small module per wire format; each turns a payload into an :class:`EmbedRequest` and vectors
back into that format's answer. They know nothing of HTTP or of the batcher."""

from embedkit.server.contracts import hf, openai, search, tei
from embedkit.server.contracts.common import EmbedRequest, Limits

__all__ = ["EmbedRequest", "Limits", "hf", "openai", "search", "tei"]

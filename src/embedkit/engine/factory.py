"""Build the engine a settings object describes: the one place settings become an embedder.

>>> from embedkit.settings import EngineSettings
>>> emb = build_embedder(EngineSettings(model="default", device="cpu"))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from embedkit.settings import EngineSettings


def build_embedder(settings: EngineSettings, *, defer_graph: bool = False, packed: bool = False) -> Any:
    """The :class:`~embedkit.Embedder` ``settings`` describe (an
    :class:`~embedkit.engine.image.ImageEmbedder` for a CLIP-family model); ``defer_graph`` and ``packed`` as
    :class:`~embedkit.Embedder` takes them."""
    from embedkit.engine.embedder import Embedder
    from embedkit.models.clip import is_clip_spec

    cls = Embedder
    if is_clip_spec(settings.model):
        from embedkit.engine.image import ImageEmbedder

        cls = ImageEmbedder  # same arguments; embeds images as well as texts
    return cls(settings.model, defer_graph=defer_graph, packed=packed, **settings.engine_options())

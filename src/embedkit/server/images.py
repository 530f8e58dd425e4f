"""Image requests on the server: fetch (if allowed) and decode off the event loop, then the vision
tower on the inference worker, in order with the text batches.

A request's images are embedded together, as the batch job embeds a unit's images: the same bytes in
the same batch give the same bits as the job's output.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import numpy as np

from embedkit.errors import InputError, InvalidImageError
from embedkit.io.fetch import Fetcher, FetchSettings
from embedkit.server.contracts import image as contract

URL_TIMEOUT_SECONDS = 10.0


def _image_embedder(service: Any) -> Any:
    emb = service.embedder
    if emb is None or not hasattr(emb, "embed_arrays"):
        name = emb.model.name if emb is not None else "the custom model"
        raise InputError(
            f"this server's model ({name}) embeds text only; serve a CLIP-family model "
            f"(--model ./clip-dir) to embed images",
            field="inputs",
        )
    return emb


def _fetcher(service: Any) -> Fetcher:
    fetcher = getattr(service, "_image_fetcher", None)
    if fetcher is None:
        fetcher = Fetcher(
            FetchSettings(
                workers=8,
                timeout=URL_TIMEOUT_SECONDS,
                retries=1,
                max_bytes=service.settings.max_body_bytes,
                schemes=("http", "https"),
            )
        )
        service._image_fetcher = fetcher
    return fetcher


async def embed_images(service: Any, req: contract.ImageRequest) -> np.ndarray:
    """Vectors of ``req``'s images; a bad image is a 400 naming its index and what is wrong."""
    batcher = service.require_ready()
    emb = _image_embedder(service)
    loop = asyncio.get_running_loop()
    blobs: list[Any] = list(req.images)
    if req.urls:
        blobs = await loop.run_in_executor(None, _fetcher(service).fetch_many, req.urls)
    for i, blob in enumerate(blobs):
        if isinstance(blob, InvalidImageError):
            raise blob.at(req.field, i)
    arrays = await loop.run_in_executor(None, emb.load_images, blobs)
    for i, item in enumerate(arrays):
        if isinstance(item, InvalidImageError):
            raise item.at(req.field, i) if req.field != "body" else _body_error(item)
    service.metrics.inputs.inc(len(arrays))
    run = functools.partial(emb.embed_arrays, arrays, normalize=req.normalize, dimensions=req.dimensions)
    return await batcher.call(run)


def _body_error(err: InvalidImageError) -> InvalidImageError:
    out = InvalidImageError(err.kind, err.detail, field="body")
    out.message = f"the request body: {err.reason}"
    return out


async def predict_body(service: Any, body: bytes) -> dict[str, Any]:
    """``{"embeddings": [float]}`` for a raw image body."""
    req = contract.from_body(body)
    return contract.respond(req, await embed_images(service, req))


async def predict_json(service: Any, payload: dict) -> dict[str, Any]:
    """``{"embeddings": ...}`` for ``{"inputs": {"image": ...}}`` / ``{"inputs": {"url": ...}}``."""
    req = contract.parse(payload, service.limits, allow_urls=service.settings.allow_image_urls)
    return contract.respond(req, await embed_images(service, req))

"""Images on ``/invocations`` (a CLIP model): raw image bodies, ``{"inputs": {"image": <base64>}}``
and, with ``--allow-image-urls``, ``{"inputs": {"url": ...}}`` (docs/images.md, "Serving").

URL fetching is off by default: it lets any caller make the server fetch any address it can reach.

>>> is_image_type("image/jpeg; q=1"), is_image_type("application/json")
(True, False)
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from embedkit.errors import InputError
from embedkit.server.contracts.common import Limits, check_batch_size, check_bool, check_dimensions

IMAGE_TYPES = frozenset(
    {
        "application/x-image",
        "image/jpeg",
        "image/jpg",
        "image/png",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/tiff",
    }
)
EXAMPLE = '{"inputs": {"image": "<base64 of a JPEG or PNG>"}}'


def is_image_type(content_type: str | None) -> bool:
    """True for the content types whose body is an encoded image."""
    return bool(content_type) and content_type.split(";", 1)[0].strip().lower() in IMAGE_TYPES  # type: ignore[union-attr]


def wants_images(payload: Any) -> bool:
    """True for ``{"inputs": {...}}``: an image request (texts are strings or lists of strings)."""
    return isinstance(payload, dict) and isinstance(payload.get("inputs"), dict)


@dataclass
class ImageRequest:
    """Images to embed (decoded from base64 or the body) or URLs to fetch first, plus options."""

    images: list[bytes] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    single: bool = True
    field: str = "inputs.image"
    normalize: bool | None = None
    dimensions: int | None = None

    def __len__(self) -> int:
        return len(self.images) or len(self.urls)


def from_body(body: bytes) -> ImageRequest:
    """A raw image body (``application/x-image``, ``image/*``)."""
    if not body:
        raise InputError("the request body is empty; send the image bytes", field="body")
    return ImageRequest(images=[body], field="body")


def parse(payload: dict, limits: Limits, *, allow_urls: bool = False) -> ImageRequest:
    """``{"inputs": {"image": b64 | [b64]}}`` or, when allowed, ``{"inputs": {"url": ... }}``."""
    inputs = payload["inputs"]
    unknown = sorted(set(inputs) - {"image", "url"})
    if unknown or len(inputs) != 1:
        raise InputError(
            f'"inputs" as an object takes one key, "image" (base64) or "url"; got {sorted(inputs)}. '
            f"Example: {EXAMPLE}",
            field="inputs",
        )
    key = next(iter(inputs))
    name = f"inputs.{key}"
    value = inputs[key]
    single = isinstance(value, str)
    items = [value] if single else value
    if not isinstance(items, list) or not items:
        raise InputError(f"{name} must be a string or a non-empty list of strings", field=name)
    check_batch_size(len(items), "images", name, limits)
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            kind = "null" if item is None else type(item).__name__
            raise InputError(f"{name}[{i}] must be a non-empty string, got {kind}", field=name, index=i)
    req = ImageRequest(single=single, field=name)
    if key == "url":
        if not allow_urls:
            raise InputError(
                "this server does not fetch image URLs (it would let callers make it reach any address); "
                'send the image itself as {"inputs": {"image": "<base64>"}} or an image/jpeg body, or start '
                "the server with --allow-image-urls behind trusted callers only",
                field=name,
            )
        bad = [i for i, u in enumerate(items) if not u.lower().startswith(("http://", "https://"))]
        if bad:
            raise InputError(f"{name}[{bad[0]}] must be an http:// or https:// URL", field=name, index=bad[0])
        req.urls = list(items)
    else:
        req.images = [_b64(item, name, i) for i, item in enumerate(items)]
    params = payload.get("parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise InputError(f"parameters must be an object, got {type(params).__name__}", field="parameters")
        unknown = sorted(set(params) - {"normalize", "dimensions"})
        if unknown:
            raise InputError(
                f"parameters has unknown key(s) {unknown}; images take normalize and dimensions",
                field="parameters",
            )
        req.normalize = check_bool(params.get("normalize"), "parameters.normalize")
        req.dimensions = check_dimensions(params.get("dimensions"), "parameters.dimensions", limits)
    return req


def _b64(text: str, name: str, index: int) -> bytes:
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise InputError(f"{name}[{index}] is a data: URL without ;base64", field=name, index=index)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            f"{name}[{index}] is not valid base64; send the image bytes base64-encoded",
            field=name,
            index=index,
        ) from None


def respond(req: ImageRequest, vecs: Any) -> dict[str, Any]:
    return {"embeddings": vecs[0] if req.single else vecs}

"""Decode images (encoded bytes, PIL images, uint8 arrays) into upright RGB PIL images.

What the image engine decodes on its pool before CLIP's resize and crop
(:class:`~embedkit.models.clip.ImageTransform`). Every failure is an
:class:`~embedkit.errors.InvalidImageError` whose ``kind`` says what is wrong with the image.

>>> to_image(np.zeros((2, 3, 3), np.uint8)).size
(3, 2)
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from embedkit.errors import InvalidImageError

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # decoded size cap (a decompression bomb guard)
ImageInput = bytes | bytearray | memoryview | Image.Image | np.ndarray


def to_image(image: ImageInput, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """One image (encoded bytes, a PIL image, or an ``(H, W, 3)`` uint8 array) as an RGB PIL image.
    Raises :class:`~embedkit.errors.InvalidImageError`."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidImageError("undecodable image", "arrays must be uint8 of shape (height, width, 3)")
        return Image.fromarray(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(image, max_pixels=max_pixels)
    kind = "null" if image is None else type(image).__name__
    raise InvalidImageError("missing image" if image is None else "not an image", f"got {kind}")


def decode_image(
    data: bytes | bytearray | memoryview, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) into an RGB image, upright per its EXIF
    orientation, transparency composited onto white (as CLIP's processor does).

    Raises :class:`~embedkit.errors.InvalidImageError` whose ``kind`` is ``missing image`` (no
    bytes), ``not an image``, ``image too large`` (over ``max_pixels``), ``truncated image`` or
    ``undecodable image``.
    """
    if data is None or len(data) == 0:
        raise InvalidImageError("missing image", "no bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImageError("not an image", f"{_sniff(data)} is no image format Pillow reads") from None
    except Image.DecompressionBombError as exc:
        raise InvalidImageError("image too large", str(exc)) from None
    except Exception as exc:
        raise InvalidImageError(_failure_kind(exc), f"{type(exc).__name__}: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise InvalidImageError(
            "image too large", f"{width}x{height} pixels, over the limit of {max_pixels} (max_image_pixels)"
        )
    if width == 0 or height == 0:
        raise InvalidImageError("undecodable image", f"{width}x{height} pixels")
    try:
        img.load()
    except Exception as exc:
        detail = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        raise InvalidImageError(_failure_kind(exc), detail) from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # a damaged EXIF block: keep the pixels as stored
        pass
    return to_rgb(img)


def _failure_kind(exc: BaseException) -> str:
    """``truncated image`` when Pillow says the data ended early, else ``undecodable image``."""
    msg = str(exc).lower()
    cut = isinstance(exc, (OSError, EOFError)) and ("truncated" in msg or "broken data stream" in msg)
    return "truncated image" if cut or isinstance(exc, EOFError) else "undecodable image"


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (what transformers' CLIP processor does)."""
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _sniff(data: bytes | bytearray | memoryview) -> str:
    head = bytes(data[:16])
    if head.lstrip().startswith((b"<", b"{", b"[")):
        return "text/markup"
    return f"{len(data)} bytes starting {head[:8].hex()}"

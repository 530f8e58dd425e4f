"""The image engine: encoded images in, CLIP vectors out, in the same space as CLIP text queries.

Images are decoded and resized on a thread pool (:mod:`embedkit.io.image_decode`,
:class:`~embedkit.models.clip.ImageTransform`) ahead of the vision tower, which the
:class:`~embedkit.engine.runner.ModelRunner` runs in batches of ``image_batch_size``. Texts go
through the CLIP text tower as in the text engine (:class:`ImageEmbedder` is an
:class:`~embedkit.Embedder`). Vectors match transformers' CLIP features (normalised) to 1e-5.

>>> from embedkit.engine.image import ImageEmbedder
>>> emb = ImageEmbedder("./clip-vit-base-patch32")                       # doctest: +SKIP
>>> images = emb.encode_images([open("cat.jpg", "rb").read()])           # doctest: +SKIP
>>> texts = emb.encode(["a photo of a cat", "a photo of a dog"])         # doctest: +SKIP
>>> (texts @ images.T).ravel()                                           # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from embedkit.engine.embedder import Embedder
from embedkit.engine.runner import Replica, RunnerTotals, Workload
from embedkit.errors import ConfigError, InvalidImageError, OutOfMemoryError
from embedkit.io.image_decode import DEFAULT_MAX_IMAGE_PIXELS, ImageInput, to_image
from embedkit.models.clip import ClipModel, ImageTransform, features, load_clip_model


@dataclass
class ImageStats(RunnerTotals):
    """Running totals of the image side (thread-safe updates)."""

    images: int = 0
    rejected: int = 0


@dataclass
class ImageBatchResult:
    """What :meth:`ImageEmbedder.embed_encoded` made of a sequence of encoded images."""

    vectors: np.ndarray  # (len(ok), dim), rows in input order of ``ok``
    ok: list[int]  # input indices embedded
    failures: dict[int, InvalidImageError]  # input index -> why it was not


class ImageEmbedder(Embedder):
    """Embed images and texts with one CLIP-family model, in one normalised vector space.

    Takes the :class:`~embedkit.Embedder` arguments (the text side: ``max_batch_tokens``,
    ``truncate``, ``dimensions``...) plus:

    Args:
        image_batch_size: images per forward pass (default: ``max_batch_size``, else 32 on CPU and
            128 on GPU).
        decode_workers: threads decoding and resizing images (default: the CPU count, 2 to 8).
        max_image_pixels: decoded images larger than this are rejected (``image too large``).
    """

    def __init__(
        self,
        model: str | Path | ClipModel,
        *,
        pooling: str | None = None,
        image_batch_size: int | None = None,
        decode_workers: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        **engine: Any,
    ) -> None:
        if pooling not in (None, "clip"):
            raise ConfigError(
                f"pooling {pooling!r} does not apply to CLIP models (they pool by their EOS token)"
            )
        if isinstance(model, ClipModel):
            clip = model
        else:
            from embedkit.models import resolve_model

            clip = load_clip_model(resolve_model(model))
        super().__init__(clip, **engine)
        self.model: ClipModel = clip
        self.spec = str(model) if not isinstance(model, ClipModel) else str(model.path)
        default_batch = 128 if self.device.type == "cuda" else 32
        self.image_batch_size = int(image_batch_size or engine.get("max_batch_size") or default_batch)
        self.decode_workers = int(decode_workers or max(2, min(8, os.cpu_count() or 2)))
        self.max_image_pixels = int(max_image_pixels)
        self.transform = ImageTransform(clip.image)
        self.image_stats = ImageStats()
        self._decode_pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="embedkit-decode")

    # ----------------------------------------------------------------- set-up
    def _prepare_model(self) -> None:
        """Place the whole CLIP model (both towers) on the runner's devices."""
        self._clip = self.runner.place(self.model.clip, cpu_fusion=self.cpu_fusion)
        self._transformer = self._clip.text_model

    # ------------------------------------------------------------ description
    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(
            modality="image+text",
            image_size=list(self.transform.pre.output_size),
            image_batch_size=self.image_batch_size,
            decode_workers=self.decode_workers,
            max_image_pixels=self.max_image_pixels,
        )
        return out

    # ------------------------------------------------------------- text tower
    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, replica: int = 0, outputs: tuple = ("dense",)
    ) -> torch.Tensor:
        """CLIP's text tower (dense only: ``outputs`` is the text engine's signature)."""
        clip = self.runner.replicas[replica].module
        with self.runner.context(replica):
            vecs = features(clip.get_text_features(input_ids=input_ids, attention_mask=mask))
        return vecs.float()

    # ------------------------------------------------------- stage: decode
    def load_image(self, image: ImageInput) -> np.ndarray:
        """One image (encoded bytes, a PIL image, or an ``(H, W, 3)`` uint8 array) as the model's
        uint8 ``(H, W, 3)`` input. Raises :class:`~embedkit.errors.InvalidImageError`."""
        return self.transform(to_image(image, max_pixels=self.max_image_pixels))

    def load_images(self, images: Sequence[ImageInput]) -> list[np.ndarray | InvalidImageError]:
        """Decode ``images`` on the decode pool; each entry is an array or the error it raised."""
        return list(self._decode_pool.map(self._try_load, images))

    def _try_load(self, image: ImageInput) -> np.ndarray | InvalidImageError:
        try:
            return self.load_image(image)
        except InvalidImageError as exc:
            return exc

    # --------------------------------------------------------- stage: core
    def _pixels(self, arrays: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # uint8 NCHW
        return self.transform.normalize(self.runner.to_device(batch, device))

    def _image_forward(self, pixels: torch.Tensor, replica: int) -> tuple[torch.Tensor, dict]:
        with self.runner.context(replica):
            out = self.runner.replicas[replica].module.get_image_features(pixel_values=pixels)
            vecs = features(out).float()
        return vecs, {"images": len(pixels)}

    def _image_workload(self, arrays: Sequence[np.ndarray]) -> Workload:
        """The runner's view of ``arrays``: pixel batches, the image batch size as the budget."""

        def prepare(idx: np.ndarray, replica: Replica) -> torch.Tensor:
            pixels = self._pixels([arrays[i] for i in idx], replica.device)
            dtype = next(replica.module.vision_model.parameters()).dtype
            return pixels.to(dtype) if dtype in (torch.float16, torch.bfloat16) else pixels

        def shrink(idx: np.ndarray) -> str:
            self.image_batch_size = max(1, min(self.image_batch_size, len(idx) // 2))
            return f"out of memory on {len(idx)} images; image batch size now {self.image_batch_size}"

        return Workload(
            prepare=prepare,
            forward=self._image_forward,
            shrink=shrink,
            too_big=lambda i, device: OutOfMemoryError(f"one image does not fit in memory on {device}"),
            stats=self.image_stats,
        )

    def embed_arrays(
        self, arrays: Sequence[np.ndarray], *, normalize: bool | None = None, dimensions: int | None = None
    ) -> np.ndarray:
        """Vectors of already decoded images (uint8 ``(H, W, 3)`` at the model's input size), in
        batches of ``image_batch_size``; rows in input order (float32)."""
        step, n = self.image_batch_size, len(arrays)
        batches = [np.arange(a, min(a + step, n)) for a in range(0, n, step)]
        return self._run(self._image_workload(arrays), batches, n, normalize, dimensions)

    # ---------------------------------------------------------- public API
    def encode_images(
        self,
        images: Sequence[ImageInput],
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        field: str = "images",
        offset: int = 0,
    ) -> np.ndarray:
        """Embed images (encoded bytes, PIL images or uint8 arrays) into ``(len(images), dim)``.

        Raises :class:`~embedkit.errors.InvalidImageError` naming the first image that cannot be
        decoded (``images[3]: truncated image: ...``)."""
        if isinstance(images, (bytes, bytearray, memoryview, Image.Image, np.ndarray)):
            raise ConfigError("encode_images takes a list of images; wrap a single one in a list")
        loaded = self.load_images(images)
        for i, item in enumerate(loaded):
            if isinstance(item, InvalidImageError):
                raise item.at(field, i + offset)
        return self.embed_arrays(loaded, normalize=normalize, dimensions=dimensions)  # type: ignore[arg-type]

    def embed_encoded(
        self,
        images: Iterable[ImageInput],
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
        stop: Callable[[], bool] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> ImageBatchResult | None:
        """Embed a stream of images, skipping (and reporting) those that cannot be decoded; decoding
        runs a bounded window ahead of the model. Returns None once ``stop()`` (checked between
        batches) is True; ``on_batch(n)`` follows each batch of ``n`` images."""
        window = max(2 * self.image_batch_size, self.image_batch_size + 2 * self.decode_workers)
        pending: deque[tuple[int, Future]] = deque()
        it = enumerate(images)
        ok: list[int] = []
        failures: dict[int, InvalidImageError] = {}
        chunks: list[np.ndarray] = []
        ready: list[np.ndarray] = []
        ready_idx: list[int] = []
        exhausted = False

        def refill() -> None:
            nonlocal exhausted
            while not exhausted and len(pending) < window:
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                    return
                pending.append((nxt[0], self._decode_pool.submit(self._try_load, nxt[1])))

        def flush() -> bool:
            if stop is not None and stop():
                return False
            chunks.append(self.embed_arrays(ready, normalize=normalize, dimensions=dimensions))
            ok.extend(ready_idx)
            if on_batch is not None:
                on_batch(len(ready))
            ready.clear()
            ready_idx.clear()
            return True

        try:
            refill()
            while pending:
                idx, fut = pending.popleft()
                refill()
                item = fut.result()
                if isinstance(item, InvalidImageError):
                    failures[idx] = item
                    self.image_stats.add(rejected=1)
                else:
                    ready.append(item)
                    ready_idx.append(idx)
                if len(ready) >= self.image_batch_size and not flush():
                    return None
            if ready and not flush():
                return None
        finally:
            for _idx, fut in pending:
                fut.cancel()
        dim = self.dimension if dimensions is None else int(dimensions)
        vectors = np.concatenate(chunks) if chunks else np.empty((0, dim), np.float32)
        return ImageBatchResult(vectors, ok, failures)

    def warmup(self) -> None:
        super().warmup()
        h, w = self.transform.pre.output_size
        self.embed_arrays([np.zeros((h, w, 3), np.uint8)])

    def close(self) -> None:
        super().close()
        self._decode_pool.shutdown(wait=False)

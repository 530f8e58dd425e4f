"""Load a CLIP-family model (image tower + text tower sharing one vector space) from a local directory.

A plain Hugging Face CLIP layout (``model_type: clip``, a processor config) gives a :class:`ClipModel`:
a :class:`~embedkit.models.TextModel` (the text engine runs its text tower unchanged) that also
carries the image tower and the processor's settings, which :class:`ImageTransform` applies.

Environment notes (transformers 5): ``CLIPImageProcessor`` needs torchvision, which does not install
beside a pinned CPU torch; ``AutoImageProcessor`` then gives ``CLIPImageProcessorPil``. embedkit only
reads the processor's settings (sizes, mean, std...) and does the work itself, so either works, and
without any processor class the JSON file is read directly. ``get_image_features`` returns a
model-output object in transformers 5 (a tensor before): :func:`features` accepts both.

>>> from embedkit.models.clip import is_clip_dir
>>> is_clip_dir("/nonexistent")
False
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from embedkit.errors import ModelLoadError
from embedkit.models.text import TextModel, display_name, quiet_transformers, read_config_json

log = logging.getLogger(__name__)

CLIP_MODEL_TYPES = ("clip",)
_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocess:
    """What the model's image processor does, as plain numbers (CLIP defaults)."""

    shortest_edge: int | None = 224  # resize so the short side is this (aspect kept) ...
    resize_to: tuple[int, int] | None = None  # ... or to exactly (height, width)
    crop: tuple[int, int] | None = (224, 224)  # center crop (height, width); None: no crop
    resample: int = 3  # PIL resampling filter (3 = bicubic)
    rescale_factor: float | None = 1 / 255  # None: no rescale
    mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN  # None: no normalisation
    std: tuple[float, ...] | None = OPENAI_CLIP_STD

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the arrays the model receives."""
        if self.crop is not None:
            return self.crop
        if self.resize_to is not None:
            return self.resize_to
        raise ModelLoadError("image preprocessing without crop or fixed resize gives images of varying size")

    def to_dict(self) -> dict[str, Any]:
        return {
            "shortest_edge": self.shortest_edge,
            "resize_to": self.resize_to,
            "crop": self.crop,
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "mean": self.mean,
            "std": self.std,
        }


def preprocess_from_config(cfg: dict[str, Any]) -> ImagePreprocess:
    """Read an image processor's JSON settings (``preprocessor_config.json`` or the ``image_processor``
    part of ``processor_config.json``). Missing keys take CLIP's defaults."""
    size = cfg.get("size", {"shortest_edge": 224})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    shortest = resize_to = None
    if cfg.get("do_resize", True):
        if size.get("shortest_edge"):
            shortest = int(size["shortest_edge"])
        elif size.get("height") and size.get("width"):
            resize_to = (int(size["height"]), int(size["width"]))
        else:
            raise ModelLoadError(
                f"image processor size {size!r} is not supported (shortest_edge or height/width)"
            )
    crop = None
    if cfg.get("do_center_crop", True):
        cs = cfg.get("crop_size", {"height": 224, "width": 224})
        if isinstance(cs, int):
            cs = {"height": cs, "width": cs}
        crop = (int(cs["height"]), int(cs["width"]))
    resample = cfg.get("resample", 3)
    if isinstance(resample, str):
        resample = _RESAMPLE_NAMES.get(resample.lower(), 3)
    mean = std = None
    if cfg.get("do_normalize", True):
        mean = tuple(float(x) for x in cfg.get("image_mean", OPENAI_CLIP_MEAN))
        std = tuple(float(x) for x in cfg.get("image_std", OPENAI_CLIP_STD))
    rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
    if cfg.get("do_pad"):
        raise ModelLoadError("image processors that pad are not supported by embedkit")
    pre = ImagePreprocess(shortest, resize_to, crop, int(resample), rescale, mean, std)
    pre.output_size  # noqa: B018 - raises when the output size would vary
    return pre


def read_preprocess(path: Path) -> ImagePreprocess:
    """The image preprocessing of the model in ``path`` (classic or transformers-5 layout)."""
    pre_cfg = path / "preprocessor_config.json"
    if pre_cfg.is_file():
        return preprocess_from_config(read_config_json(pre_cfg))
    proc_cfg = read_config_json(path / "processor_config.json")
    if isinstance(proc_cfg.get("image_processor"), dict):
        return preprocess_from_config(proc_cfg["image_processor"])
    raise ModelLoadError(
        f"{path} holds a CLIP model but no image processor settings (preprocessor_config.json or "
        f"processor_config.json); save the model's processor beside it (processor.save_pretrained(dir))"
    )


class ImageTransform:
    """Resize + center crop as the model's processor does, on the CPU, into uint8 ``(H, W, 3)``
    (calling it); then :meth:`normalize` rescales a uint8 batch on the model's device."""

    def __init__(self, pre: ImagePreprocess) -> None:
        self.pre = pre
        self.out_h, self.out_w = pre.output_size
        self.scale = float(pre.rescale_factor) if pre.rescale_factor is not None else 1.0
        mean = pre.mean if pre.mean is not None else (0.0, 0.0, 0.0)
        std = pre.std if pre.std is not None else (1.0, 1.0, 1.0)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """A uint8 NCHW batch (on any device) as float32 pixels: rescaled, minus mean, over std."""
        x = batch.float() * self.scale
        return (x - self.mean.to(batch.device)) / self.std.to(batch.device)

    def __call__(self, img: Image.Image) -> np.ndarray:
        pre = self.pre
        w, h = img.size
        if pre.shortest_edge is not None:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = pre.shortest_edge, int(pre.shortest_edge * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            if size != (w, h):
                img = img.resize(size, resample=pre.resample)
        elif pre.resize_to is not None and (h, w) != pre.resize_to:
            img = img.resize((pre.resize_to[1], pre.resize_to[0]), resample=pre.resample)
        arr = np.asarray(img, dtype=np.uint8)
        if pre.crop is not None:
            arr = _center_crop(arr, *pre.crop)
        return arr


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """Center crop to ``(ch, cw)``, zero-padding a side that is smaller (as transformers does)."""
    h, w = arr.shape[:2]
    if h >= ch and w >= cw:
        top, left = (h - ch) // 2, (w - cw) // 2
        return arr[top : top + ch, left : left + cw]
    out = np.zeros((max(h, ch), max(w, cw), arr.shape[2]), dtype=arr.dtype)
    top, left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    out[top : top + h, left : left + w] = arr
    top, left = (out.shape[0] - ch) // 2, (out.shape[1] - cw) // 2
    return out[top : top + ch, left : left + cw]


@dataclass
class ClipModel(TextModel):
    """A CLIP-family model: ``transformer`` is its text tower, ``clip`` the whole model (both towers
    and projections), ``image`` its preprocessing. Vectors are normalised by default (CLIP compares
    images and texts by cosine)."""

    clip: Any = None
    image: ImagePreprocess = field(default_factory=ImagePreprocess)
    projection_dim: int = 0

    @property
    def dimension(self) -> int:
        return int(self.projection_dim)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.clip.parameters())


def clip_model_type(path: Path) -> str | None:
    """``config.json``'s ``model_type`` when it names a CLIP-family model, else None."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_type = str(cfg.get("model_type", ""))
    return model_type if model_type in CLIP_MODEL_TYPES else None


def is_clip_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a CLIP-family model."""
    p = Path(path)
    return p.is_dir() and clip_model_type(p) is not None


def is_clip_spec(spec: str | Path | None) -> bool:
    """True when a model spec (local dir, archive, ``s3://``) resolves to a CLIP-family model. Resolves
    the spec (s3:// downloads land in the cache, so loading afterwards is free)."""
    from embedkit.models.resolve import DEFAULT_MODEL_ALIASES, resolve_model

    if spec is None or str(spec).strip().lower() in DEFAULT_MODEL_ALIASES | {""}:
        return False
    try:
        return is_clip_dir(resolve_model(spec))
    except Exception:  # not resolvable here: the text loader reports it properly
        return False


def features(out: Any) -> torch.Tensor:
    """The embedding tensor from ``get_image_features`` / ``get_text_features``: a tensor in
    transformers 4, a model-output object (``pooler_output``) in transformers 5."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and isinstance(out, (tuple, list)):
        pooled = out[1] if len(out) > 1 else out[0]
    if pooled is None:
        raise ModelLoadError(f"cannot find the embedding in a {type(out).__name__} returned by the model")
    return pooled


def load_clip_model(path: str | Path, *, normalize: bool | None = None) -> ClipModel:
    """Load the CLIP model in ``path`` (already resolved to a local directory) on the CPU in float32."""
    from transformers import AutoModel, AutoTokenizer

    quiet_transformers()
    path = Path(path)
    model_type = clip_model_type(path)
    if model_type is None:
        raise ModelLoadError(
            f"{path} is not a CLIP-family model (config.json model_type must be one of "
            f"{', '.join(CLIP_MODEL_TYPES)}); image embedding needs one"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clip = AutoModel.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Cannot load the CLIP model in {path}: {exc}") from exc
    if not hasattr(clip, "get_image_features") or not hasattr(clip, "get_text_features"):
        raise ModelLoadError(f"{path}: {type(clip).__name__} has no image and text towers")
    clip.eval()
    raw_cfg = read_config_json(path / "config.json")
    text_cfg = clip.config.text_config
    limits = [int(text_cfg.max_position_embeddings)]
    tml = getattr(tokenizer, "model_max_length", None)
    if tml and tml < 1_000_000:
        limits.append(int(tml))
    return ClipModel(
        path=path,
        tokenizer=tokenizer,
        transformer=clip.text_model,
        pooling="clip",
        normalize=True if normalize is None else bool(normalize),
        max_seq_length=min(limits),
        model_type=model_type,
        name=display_name(path, raw_cfg),
        clip=clip,
        image=read_preprocess(path),
        projection_dim=int(clip.config.projection_dim),
    )

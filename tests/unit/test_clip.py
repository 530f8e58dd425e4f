"""CLIP models and the image engine: parity with transformers, decoding rules, loading paths."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from embedkit.engine import build_embedder
from embedkit.engine.image import ImageEmbedder
from embedkit.errors import InvalidImageError, ModelLoadError, OutOfMemoryError
from embedkit.io.image_decode import decode_image
from embedkit.models.clip import ImageTransform, is_clip_dir, load_clip_model, read_preprocess
from embedkit.settings import EngineSettings
from tests.integration.image_data import encode, image_array, jpeg


def _images() -> list[Image.Image]:
    """Varied shapes: portrait, landscape, smaller than the crop, grayscale, transparent PNG."""
    out = [Image.fromarray(image_array(i, 30 + 7 * i, 52 - 5 * i)) for i in range(5)]
    out.append(Image.fromarray(image_array(9, 12, 20)))  # smaller than the 32x32 crop
    out.append(Image.fromarray(image_array(10, 40, 40)).convert("L"))
    rgba = np.dstack([image_array(11, 36, 44), np.full((36, 44), 128, np.uint8)])
    out.append(Image.fromarray(rgba, "RGBA"))
    return out


def _reference(path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(path)).eval()
    return model, AutoImageProcessor.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_image_and_text_vectors_match_transformers_clip(tiny_clip, clip_embedder):
    model, processor, tokenizer = _reference(tiny_clip)
    images = _images()
    blobs = [encode(np.asarray(im), "PNG") for im in images]
    got = clip_embedder.encode_images(blobs)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    texts = ["a photo of a cat", "dog", "a big red car in the sun " * 6, "Ünïcode ✓ with a tree"]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.inference_mode():
        want_img = torch.nn.functional.normalize(
            _features(model.get_image_features(pixel_values=pixels)), dim=1
        )
        want_txt = torch.nn.functional.normalize(_features(model.get_text_features(**batch)), dim=1)
    assert got.shape == (len(images), 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, want_img.numpy(), atol=1e-5)
    res = clip_embedder.embed(texts)
    np.testing.assert_allclose(res.embeddings, want_txt.numpy(), atol=1e-5)
    assert res.truncated.tolist() == [False, False, True, False]
    # Images and texts live in one normalised space: cosine similarity is a dot product.
    sims = res.embeddings @ got.T
    assert sims.shape == (4, len(images)) and np.all(np.abs(sims) <= 1 + 1e-6)


def test_pixels_match_the_clip_processor(tiny_clip, clip_embedder):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(tiny_clip))
    transform = ImageTransform(read_preprocess(tiny_clip))
    for im in _images():
        ours = transform(decode_image(encode(np.asarray(im), "PNG")))
        x = clip_embedder._pixels([ours], torch.device("cpu")).numpy()[0]
        want = processor(images=[im], return_tensors="np")["pixel_values"][0]
        assert x.shape == want.shape == (3, 32, 32)
        np.testing.assert_allclose(x, want, atol=1e-5)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "missing image"),
        (b"<html>404 not found</html>", "not an image"),
        (jpeg(1, 64, 64)[:300], "truncated image"),
        (encode(image_array(2, 64, 64), "PNG")[:200], "truncated image"),
    ],
    ids=["empty", "html", "truncated-jpeg", "truncated-png"],
)
def test_decode_failures_name_their_kind(data, kind):
    with pytest.raises(InvalidImageError) as info:
        decode_image(data)
    assert info.value.kind == kind
    assert info.value.reason.startswith(kind + ": ")


def test_decode_refuses_images_over_the_pixel_limit():
    with pytest.raises(InvalidImageError, match=r"image too large: 64x48 pixels, over the limit of 1000"):
        decode_image(jpeg(3, 48, 64), max_pixels=1000)


def test_decode_applies_exif_orientation_and_composites_transparency():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    buf = io.BytesIO()
    Image.fromarray(image_array(4, 20, 40)).save(buf, "JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 40)
    clear = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    img = decode_image(encode(np.asarray(clear), "PNG"))
    assert img.mode == "RGB" and np.all(np.asarray(img) == 255)


def test_encode_images_names_the_bad_index(clip_embedder):
    good = jpeg(5)
    with pytest.raises(InvalidImageError, match=r"^images\[2\]: not an image"):
        clip_embedder.encode_images([good, good, b"plain text, not pixels"])


def test_embed_encoded_skips_bad_images_keeps_order_and_stops(clip_embedder):
    good = [jpeg(20 + i) for i in range(7)]
    stream = [good[0], b"junk", good[1], good[2][:100], *good[3:], b""]
    want = clip_embedder.encode_images([good[0], good[1], *good[3:]])
    old = clip_embedder.image_batch_size
    clip_embedder.image_batch_size = 3  # several batches, decoded ahead of the model
    try:
        seen: list[int] = []
        res = clip_embedder.embed_encoded(stream, on_batch=seen.append)
        assert res is not None
        assert res.ok == [0, 2, 4, 5, 6, 7]
        assert {i: e.kind for i, e in res.failures.items()} == {
            1: "not an image",
            3: "truncated image",
            8: "missing image",
        }
        np.testing.assert_allclose(res.vectors, want, atol=1e-6)
        assert sum(seen) == 6 and seen[0] == 3
        assert clip_embedder.embed_encoded(stream, stop=lambda: True) is None
    finally:
        clip_embedder.image_batch_size = old


def test_dimensions_and_normalisation_apply_to_images(clip_embedder):
    blobs = [jpeg(30), jpeg(31)]
    full = clip_embedder.encode_images(blobs)
    short = clip_embedder.encode_images(blobs, dimensions=8)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        short, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True), atol=1e-6
    )
    raw = clip_embedder.encode_images(blobs, normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), full, atol=1e-6)


def test_engine_settings_build_an_image_embedder_for_clip_dirs_only(tiny_clip, tiny_model):
    emb = build_embedder(EngineSettings(model=str(tiny_clip), device="cpu", batch_size=4))
    assert isinstance(emb, ImageEmbedder)
    assert emb.image_batch_size == 4 and emb.dimension == 16 and emb.max_seq_length == 24
    assert emb.describe()["modality"] == "image+text" and emb.info().pooling == "clip"
    assert not isinstance(build_embedder(EngineSettings(model=str(tiny_model), device="cpu")), ImageEmbedder)
    assert is_clip_dir(tiny_clip) and not is_clip_dir(tiny_model)
    with pytest.raises(ModelLoadError, match="not a CLIP-family model"):
        load_clip_model(tiny_model)


def test_transformers5_processor_layout_is_read(tiny_clip, tmp_path):
    """transformers 5 saves a processor as processor_config.json (image settings nested)."""
    copy = tmp_path / "clip5"
    shutil.copytree(tiny_clip, copy)
    settings = json.loads((copy / "preprocessor_config.json").read_text())
    (copy / "preprocessor_config.json").unlink()
    (copy / "processor_config.json").write_text(
        json.dumps({"image_processor": settings, "processor_class": "CLIPProcessor"})
    )
    assert read_preprocess(copy) == read_preprocess(tiny_clip)
    (copy / "processor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="no image processor settings"):
        read_preprocess(copy)


def test_clip_model_from_an_s3_archive(tiny_clip, clip_embedder, moto_server, s3_bucket, tmp_path):
    import boto3

    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_clip, arcname=".")
    boto3.client("s3", endpoint_url=moto_server).upload_file(str(archive), s3_bucket, "clip/model.tar.gz")
    emb = build_embedder(EngineSettings(model=f"s3://{s3_bucket}/clip/model.tar.gz", device="cpu"))
    assert isinstance(emb, ImageEmbedder)
    blobs = [jpeg(40), jpeg(41)]
    np.testing.assert_array_equal(emb.encode_images(blobs), clip_embedder.encode_images(blobs))
    np.testing.assert_array_equal(emb.encode(["a red car"]), clip_embedder.encode(["a red car"]))


def test_bf16_stays_close_to_fp32(tiny_clip, clip_embedder):
    from embedkit.engine.device import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    emb = ImageEmbedder(str(tiny_clip), device="cpu", precision="bf16")
    blobs = [jpeg(50 + i) for i in range(4)]
    cos = np.sum(emb.encode_images(blobs) * clip_embedder.encode_images(blobs), axis=1)
    assert cos.min() > 0.99


def test_info_describes_a_clip_model(tiny_clip, capsys):
    from embedkit.cli import main

    assert main(["info", str(tiny_clip), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["model_type"], info["dimension"], info["pooling"], info["max_seq_length"]) == (
        "clip",
        16,
        "clip",
        24,
    )


def test_out_of_memory_on_images_splits_the_batch_and_loses_nothing(tiny_clip, clip_embedder):
    emb = ImageEmbedder(str(tiny_clip), device="cpu", image_batch_size=16)
    blobs = [jpeg(60 + i) for i in range(12)]
    real = emb._clip.get_image_features

    def oom_on_big_batches(*args, **kwargs):
        if kwargs["pixel_values"].shape[0] > 4:
            raise MemoryError("simulated: batch too large for this device")
        return real(*args, **kwargs)

    emb._clip.get_image_features = oom_on_big_batches
    assert np.abs(emb.encode_images(blobs) - clip_embedder.encode_images(blobs)).max() <= 1e-6
    assert emb.image_stats.oom_splits >= 2 and emb.image_batch_size <= 4

    def always_oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    emb._clip.get_image_features = always_oom
    with pytest.raises(OutOfMemoryError, match="one image does not fit"):
        emb.encode_images(blobs[:1])


def test_image_replicas_on_several_devices_give_identical_vectors(tiny_clip, clip_embedder):
    multi = ImageEmbedder(str(tiny_clip), device="cpu,cpu", image_batch_size=3)
    blobs = [jpeg(70 + i) for i in range(10)]
    assert np.abs(multi.encode_images(blobs) - clip_embedder.encode_images(blobs)).max() <= 1e-6
    assert multi.image_stats.batches == 4 and multi.describe()["device"] == "cpu,cpu"

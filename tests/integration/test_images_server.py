"""``embedkit serve --model <CLIP dir>``: image bodies, base64 JSON, text queries and (opt-in) URLs on
a real server process; its image vectors are the batch job's for the same images."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedkit.batch import embed_dataset
from embedkit.errors import InputError
from embedkit.server.contracts.common import Limits
from embedkit.server.contracts.image import parse
from tests.contract.serving import ServerProcess
from tests.integration.image_data import (
    encode,
    http_server,
    image_array,
    jpeg,
    shard_rows,
    write_webdataset_shard,
)


@pytest.fixture(scope="module")
def server(tiny_clip, tmp_path_factory):
    srv = ServerProcess(
        ["--model", str(tiny_clip), "--allow-image-urls", "yes"],
        log_dir=tmp_path_factory.mktemp("serve-clip"),
    )
    with srv:
        yield srv


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _post(srv, body, **kw) -> httpx.Response:
    return (
        httpx.post(srv.url + "/invocations", content=body, timeout=30, **kw)
        if isinstance(body, bytes)
        else httpx.post(srv.url + "/invocations", json=body, timeout=30, **kw)
    )


def test_image_bodies_and_base64_json_give_the_engines_vectors(server, clip_embedder):
    img = jpeg(80)
    png = encode(image_array(81), "PNG")
    want = clip_embedder.encode_images([img])[0]
    for ctype, body in (("application/x-image", img), ("image/jpeg", img), ("image/png", png)):
        r = _post(server, body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["embeddings"], np.float32)
        assert got.shape == (16,)
        ref = want if body is img else clip_embedder.encode_images([png])[0]
        np.testing.assert_array_equal(got, ref)
    r = _post(
        server, {"inputs": {"image": "data:image/png;base64," + _b64(png)}, "parameters": {"dimensions": 8}}
    )
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 8
    np.testing.assert_allclose(
        r.json()["embeddings"], clip_embedder.encode_images([png], dimensions=8)[0], atol=1e-7
    )
    npy = _post(server, img, headers={"Content-Type": "image/jpeg", "Accept": "application/x-npy"})
    assert npy.headers["content-type"] == "application/x-npy"


def test_text_queries_share_the_space_with_images(server, clip_embedder):
    r = _post(server, {"inputs": ["a photo of a cat", "a red car"]})
    assert r.status_code == 200, r.text
    texts = np.asarray(r.json()["embeddings"], np.float32)
    np.testing.assert_array_equal(texts, clip_embedder.encode(["a photo of a cat", "a red car"]))
    tei = httpx.post(server.url + "/embed", json={"inputs": "a red car"}, timeout=30).json()
    np.testing.assert_allclose(tei[0], texts[1], atol=1e-6)
    info = httpx.get(server.url + "/info", timeout=10).json()
    assert info["modality"] == "image+text" and info["dimension"] == 16


def test_server_vectors_equal_the_batch_jobs_for_the_same_images(server, clip_embedder, tmp_path):
    rows = shard_rows(5, ["ok", "ok", "png", "ok", "ok", "ok"])
    write_webdataset_shard(str(tmp_path / "in"), 5, rows)
    embed_dataset(str(tmp_path / "in"), str(tmp_path / "out"), embedder=clip_embedder, progress="none")
    (part,) = (tmp_path / "out").glob("part-*.parquet")
    table = pq.read_table(part)
    emb = table.column("embedding").combine_chunks()
    job = emb.flatten().to_numpy().reshape(len(table), 16)
    assert table.column("key").to_pylist() == [r.key for r in rows]
    # The unit's images in one request: the same batch as the job's, so the same bits.
    r = _post(server, {"inputs": {"image": [_b64(r.data) for r in rows]}})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(r.json()["embeddings"], np.float32), job)
    # One image per request: a batch of one, equal to float32 rounding.
    for i in (0, 2):
        one = _post(server, rows[i].data, headers={"Content-Type": "application/x-image"}).json()[
            "embeddings"
        ]
        np.testing.assert_allclose(one, job[i], atol=1e-6)


def test_bad_images_are_400s_naming_the_image(server):
    r = _post(server, b"<html>not an image</html>", headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 400 and r.json()["error"].startswith("the request body: not an image")
    good = _b64(jpeg(82))
    r = _post(server, {"inputs": {"image": [good, _b64(jpeg(83)[:300])]}})
    assert r.status_code == 400 and r.json()["error"].startswith("inputs.image[1]: truncated image")
    r = _post(server, {"inputs": {"image": [good, "%%% not base64"]}})
    assert r.status_code == 400 and "inputs.image[1] is not valid base64" in r.json()["error"]
    r = _post(server, {"inputs": {"picture": good}})
    assert r.status_code == 400 and '"image" (base64) or "url"' in r.json()["error"]


def test_url_inputs_are_fetched_only_when_allowed(server, clip_embedder):
    img = jpeg(84)
    with http_server({"/a.jpg": (200, img, 0.0)}) as base:
        r = _post(server, {"inputs": {"url": [f"{base}/a.jpg"]}})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(
            np.asarray(r.json()["embeddings"], np.float32), clip_embedder.encode_images([img])
        )
        r = _post(server, {"inputs": {"url": f"{base}/gone.jpg"}})
        assert (
            r.status_code == 400
            and r.json()["error"] == f"inputs.url[0]: fetch failed: {base}/gone.jpg: HTTP 404"
        )
    r = _post(server, {"inputs": {"url": "file:///etc/passwd"}})
    assert r.status_code == 400 and "must be an http:// or https:// URL" in r.json()["error"]
    # Off by default: the same request is refused without fetching anything.
    with pytest.raises(InputError, match="does not fetch image URLs"):
        parse({"inputs": {"url": "http://127.0.0.1:9/x.jpg"}}, Limits(dimension=16))
    from embedkit.server.settings import ServerSettings

    assert ServerSettings.from_env({}).allow_image_urls is False


def test_a_text_model_refuses_images(tiny_model):
    """The server's image path on a real Service holding a text model (in-process: no second server)."""
    from embedkit.server import images
    from embedkit.server.service import Service
    from embedkit.server.settings import ServerSettings
    from embedkit.settings import EngineSettings

    async def main() -> str:
        service = Service(EngineSettings(model=str(tiny_model), device="cpu"), ServerSettings())
        service.start(asyncio.get_running_loop())
        deadline = time.monotonic() + 60
        while not service.healthy and service.state == "loading" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:
            with pytest.raises(InputError) as info:
                await images.predict_body(service, jpeg(85))
            return str(info.value)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, service.stop)

    assert "embeds text only; serve a CLIP-family model" in asyncio.run(main())

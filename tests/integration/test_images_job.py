"""The batch job on image datasets: img2dataset webdataset shards (tar + parquet + stats), parquet
with image bytes, URL lists served from a loopback HTTP server, on local disk and S3 (moto)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkit.batch import embed_dataset
from embedkit.cli import main as cli
from embedkit.errors import ConfigError
from embedkit.io.fs import get_fs
from tests.integration.image_data import (
    http_server,
    jpeg,
    shard_rows,
    write_bytes_parquet,
    write_webdataset_shard,
)

CAP = 60_000  # --max-image-bytes in these tests: the "big" PNG is over it


def _read(url: str) -> tuple[pa.Table, list[dict]]:
    """All part files (sorted by id) and all rejects of a job output."""
    fs, root = get_fs(str(url))
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    parts = [pq.read_table(fs.open(f"{root}/{n}", "rb")) for n in names if n.startswith("part-")]
    table = pa.concat_tables(parts).sort_by("id") if parts else None
    rejects: list[dict] = []
    if fs.exists(f"{root}/rejects"):
        for p in sorted(fs.ls(f"{root}/rejects", detail=False)):
            rejects.extend(pq.read_table(fs.open(p, "rb")).to_pylist())
    return table, rejects


def _vectors(table: pa.Table, column: str = "embedding") -> np.ndarray:
    col = table.column(column).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(table), col.type.list_size)


def _dataset(url: str) -> dict[str, object]:
    """Two webdataset shards and one parquet-with-bytes shard with every kind of bad row;
    returns key -> good image bytes, or the reject kind expected."""
    shard0 = shard_rows(0, ["ok", "ok", "failed", "truncated", "garbage", "missing", "png", "ok"])
    shard1 = shard_rows(1, ["ok", "failed", "ok", "big", "ok"])
    shard2 = shard_rows(2, ["ok", "failed", "truncated", "missing", "ok"])
    write_webdataset_shard(url, 0, shard0)
    stray = shard_rows(9, ["ok"])  # in 00001.tar but not in 00001.parquet
    write_webdataset_shard(url, 1, shard1, unlisted=stray)
    write_bytes_parquet(url, 2, shard2)
    kinds = {
        "failed": "download failed",
        "truncated": "truncated image",
        "garbage": "not an image",
        "missing": "missing image",
        "big": "oversized image",
    }
    rows = shard0 + shard1 + stray + shard2
    return {r.key: (r.data if r.kind in ("ok", "png") else kinds[r.kind]) for r in rows}


def test_every_image_row_lands_in_output_or_rejects_with_its_reason(tmp_path, clip_embedder):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    expected = _dataset(inp)
    summary = embed_dataset(
        inp, out, embedder=clip_embedder, progress="none", embed_captions=True, max_image_bytes=CAP
    )
    table, rejects = _read(out)
    good = {k: v for k, v in expected.items() if isinstance(v, bytes)}
    assert table.column("id").to_pylist() == sorted(good)
    assert sorted(r["id"] for r in rejects) == sorted(set(expected) - set(good))
    for r in rejects:
        assert r["reason"].startswith(expected[r["id"]] + ": "), r
        assert r["source"] in ("00000.tar", "00001.tar", "00002.parquet") and r["row"] is not None
    assert any(r["reason"] == "download failed: HTTP Error 404: Not Found" for r in rejects)
    assert summary.rows_in == len(expected) and summary.rows_embedded == len(good)
    assert summary.rows_rejected == len(expected) - len(good) and summary.complete

    # Vectors are the engine's for the same bytes; metadata columns are carried through.
    np.testing.assert_allclose(
        _vectors(table), clip_embedder.encode_images([good[k] for k in sorted(good)]), atol=1e-6
    )
    rows = table.to_pylist()
    assert {"key", "caption", "url", "status", "width", "height", "exif", "sha256"} <= set(table.column_names)
    assert all(
        r["key"] == r["id"] and r["status"] == "success" and r["url"].endswith(r["key"] + ".jpg")
        for r in rows
    )
    assert table.schema.field("width").type == pa.int64() and rows[0]["width"] > 0
    caps = _vectors(table.filter(pa.compute.is_valid(table.column("caption_embedding"))), "caption_embedding")
    captions = [r["caption"] for r in rows if r["caption"] is not None]
    assert 0 < len(captions) < len(rows)  # some rows have no caption: their caption_embedding is null
    np.testing.assert_allclose(caps, clip_embedder.encode(captions), atol=1e-6)

    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["modality"] == "image" and meta["images"]["layouts"] == {"webdataset": 2, "bytes": 1}
    assert meta["rows"] == {"in": 19, "embedded": len(good), "rejected": 19 - len(good), "truncated": 0}
    assert meta["reject_kinds"] == {
        "download failed": 3,
        "truncated image": 2,
        "not an image": 1,
        "missing image": 2,
        "oversized image": 1,
    }

    # A rerun resumes: every unit is recorded, nothing is redone; other settings are refused.
    again = embed_dataset(
        inp, out, embedder=clip_embedder, progress="none", embed_captions=True, max_image_bytes=CAP
    )
    assert again.units_processed == 0 and again.units_skipped == again.units_total == 3
    with pytest.raises(Exception, match="embed_captions"):
        embed_dataset(inp, out, embedder=clip_embedder, progress="none", max_image_bytes=CAP)


def test_url_list_fetched_from_a_loopback_server(tmp_path, clip_embedder):
    (tmp_path / "in" / "img").mkdir(parents=True)
    local = jpeg(70)
    (tmp_path / "in" / "img" / "local.jpg").write_bytes(local)
    good = {"a": jpeg(71), "b": jpeg(72)}
    routes = {
        "/a.jpg": (200, good["a"], 0.0),
        "/b.jpg": (200, good["b"], 0.0),
        "/slow.jpg": (200, jpeg(73), 3.0),
        "/big.jpg": (200, b"\xff" * (CAP + 10), 0.0),
        "/page.html": (200, b"<html>a page, not an image</html>", 0.0),
    }
    with http_server(routes) as base:
        rows = [
            ("a", f"{base}/a.jpg", "a photo of a cat"),
            ("gone", f"{base}/gone.jpg", "a dog"),
            ("slow", f"{base}/slow.jpg", None),
            ("b", f"{base}/b.jpg", "a red car"),
            ("big", f"{base}/big.jpg", "big"),
            ("page", f"{base}/page.html", "html"),
            ("local", "img/local.jpg", "a tree"),
            ("nourl", None, "nothing"),
        ]
        pq.write_table(
            pa.table(
                {"url": [r[1] for r in rows], "caption": [r[2] for r in rows], "key": [r[0] for r in rows]}
            ),
            tmp_path / "in" / "urls.parquet",
        )
        summary = embed_dataset(
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            embedder=clip_embedder,
            progress="none",
            fetch_timeout=0.5,
            fetch_retries=0,
            max_image_bytes=CAP,
        )
    table, rejects = _read(tmp_path / "out")
    assert table.column("id").to_pylist() == ["a", "b", "local"]
    np.testing.assert_allclose(
        _vectors(table), clip_embedder.encode_images([good["a"], good["b"], local]), atol=1e-6
    )
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons["gone"] == f"fetch failed: {base}/gone.jpg: HTTP 404"
    assert reasons["slow"] == f"fetch failed: {base}/slow.jpg: timed out after 0.5s"
    assert reasons["big"].startswith("oversized image: ")
    assert reasons["page"].startswith("not an image: ")
    assert reasons["nourl"] == "missing image: the row has no url"
    assert set(reasons) | {"a", "b", "local"} == {r[0] for r in rows} and summary.rows_in == len(rows)


def test_webdataset_on_s3_and_the_cli(tmp_path, clip_embedder, tiny_clip, moto_server, s3_bucket):
    expected = _dataset(f"s3://{s3_bucket}/shards")
    out = f"s3://{s3_bucket}/out"
    args = ["--model", str(tiny_clip), "--modality", "image", "--max-image-bytes", str(CAP)]
    code = cli(["embed", f"s3://{s3_bucket}/shards", out, *args, "--progress", "none", "--single-file"])
    assert code == 0
    fs, root = get_fs(out)
    merged = pq.read_table(fs.open(f"{root}/embeddings.parquet", "rb")).sort_by("id")
    good = sorted(k for k, v in expected.items() if isinstance(v, bytes))
    assert merged.column("id").to_pylist() == good
    np.testing.assert_allclose(
        _vectors(merged), clip_embedder.encode_images([expected[k] for k in good]), atol=1e-6
    )


def test_modality_is_detected_and_checked_against_the_model(tmp_path, tiny_model, clip_embedder, caplog):
    from embedkit import Embedder

    text_model = Embedder(str(tiny_model), device="cpu")
    shards = str(tmp_path / "shards")
    write_webdataset_shard(shards, 0, shard_rows(0, ["ok", "ok"]))
    with pytest.raises(
        ConfigError, match=r"is an image dataset \(webdataset shards .*\) but .* is a text model"
    ):
        embed_dataset(shards, str(tmp_path / "o1"), embedder=text_model, progress="none")
    # A URL list with a text model: its captions are embedded as text, with a warning.
    urls = tmp_path / "urls"
    urls.mkdir()
    pq.write_table(
        pa.table({"url": ["http://127.0.0.1:9/x.jpg"], "caption": ["a red car"], "key": ["k"]}),
        urls / "u.parquet",
    )
    s = embed_dataset(str(urls), str(tmp_path / "o2"), embedder=text_model, progress="none")
    assert s.rows_embedded == 1 and "embedding its captions as text" in caplog.text
    # --modality text with a CLIP model embeds the caption column through the CLIP text tower.
    s = embed_dataset(
        str(urls), str(tmp_path / "o3"), embedder=clip_embedder, progress="none", modality="text"
    )
    table, _ = _read(tmp_path / "o3")
    np.testing.assert_allclose(_vectors(table), clip_embedder.encode(["a red car"]), atol=1e-6)
    with pytest.raises(ConfigError, match="--embed-captions applies to image datasets"):
        embed_dataset(
            str(urls), str(tmp_path / "o4"), embedder=clip_embedder, modality="text", embed_captions=True
        )

"""img2dataset readers and the URL fetcher: every row comes back with bytes or a reason."""

from __future__ import annotations

import io
import tarfile

import pytest

from embedkit.errors import InvalidImageError
from embedkit.io.fetch import Fetcher, FetchSettings
from embedkit.io.fs import get_fs
from embedkit.io.images import (
    meta_arrays,
    read_index,
    read_tar,
    read_webdataset,
    records_from_rows,
    split_member,
)
from tests.integration.image_data import http_server, jpeg, shard_rows, write_webdataset_shard


def test_split_member_follows_webdataset_keys():
    assert split_member("000012.jpg") == ("000012", "jpg")
    assert split_member("dir/000012.seg.PNG") == ("dir/000012", "seg.png")


def test_webdataset_shard_rows_with_failed_and_missing_images(tmp_path):
    rows = shard_rows(0, ["ok", "failed", "missing", "png", "ok"])
    write_webdataset_shard(str(tmp_path), 0, rows)
    fs, _ = get_fs(str(tmp_path))
    index = read_index(fs, str(tmp_path / "00000.parquet"))
    recs = read_webdataset(fs, str(tmp_path / "00000.tar"), "00000.tar", index)
    assert [r.row for r in recs] == [0, 1, 2, 3, 4]
    assert [r.key for r in recs] == [r.key for r in rows]
    assert recs[0].data == rows[0].data and recs[3].data == rows[3].data
    assert recs[1].error == "download failed: HTTP Error 404: Not Found" and recs[1].data is None
    assert recs[2].error.startswith("missing image: no 000000002.jpg|png|webp in 00000.tar")
    assert recs[0].meta["caption"] == rows[0].caption and recs[0].meta["status"] == "success"
    cols = meta_arrays(recs)
    assert cols["width"].type.bit_width == 64 and cols["width"].to_pylist()[0] == recs[0].meta["width"]


def test_webdataset_shard_without_its_parquet_uses_the_tar_samples(tmp_path):
    rows = shard_rows(3, ["ok", "missing", "ok"])
    write_webdataset_shard(str(tmp_path), 3, rows)
    fs, _ = get_fs(str(tmp_path))
    recs = read_webdataset(fs, str(tmp_path / "00003.tar"), "00003.tar", None)
    assert [(r.row, r.key) for r in recs] == [(0, "000030000"), (1, "000030001"), (2, "000030002")]
    assert recs[1].error.startswith("missing image") and recs[2].data == rows[2].data
    assert recs[0].meta["url"].endswith("000030000.jpg")  # from the sample's .json


def test_a_damaged_tar_keeps_what_was_read_and_says_why():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            data = jpeg(i)
            info = tarfile.TarInfo(f"k{i}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    first = 512 + -(-len(jpeg(0)) // 512) * 512  # header + padded body of k0
    cut = blob[: first + 512 + 300]  # k1's header, then only 300 bytes of its body
    samples, order, error = read_tar(cut)
    assert order == ["k0"] and samples["k0"]["jpg"] == jpeg(0)
    assert error is not None and "damaged after 1 sample" in error


def test_rows_marked_failed_or_without_bytes_carry_reasons():
    metas = [
        {"key": "a", "status": "success"},
        {"key": "b", "status": "failed_to_download", "error_message": "timeout"},
        {"key": "c", "status": "success"},
        {"key": "d", "status": "failed_to_resize", "error_message": None},
    ]
    recs = records_from_rows(metas, [b"x", None, None, None], 10, "jpg")
    assert [r.row for r in recs] == [10, 11, 12, 13]
    assert [r.error for r in recs] == [
        None,
        "download failed: timeout",
        "missing image: column 'jpg' is null",
        "download failed: failed_to_resize",
    ]


def test_fetcher_reads_local_relative_and_s3_urls(tmp_path, moto_server, s3_bucket):
    import boto3

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg(1))
    boto3.client("s3", endpoint_url=moto_server).put_object(Bucket=s3_bucket, Key="i/b.jpg", Body=jpeg(2))
    with Fetcher(FetchSettings(workers=2, max_bytes=10_000)) as f:
        got = f.fetch_many(
            [
                str(tmp_path / "img" / "a.jpg"),
                "img/a.jpg",
                f"file://{tmp_path}/img/a.jpg",
                f"s3://{s3_bucket}/i/b.jpg",
                f"s3://{s3_bucket}/i/none.jpg",
                "img/none.jpg",
                None,
            ],
            base=str(tmp_path),
        )
    assert got[:4] == [jpeg(1), jpeg(1), jpeg(1), jpeg(2)]
    assert [e.kind for e in got[4:]] == ["fetch failed", "fetch failed", "missing image"]
    assert "no such file or object" in str(got[4])


def test_fetcher_http_status_timeout_retry_and_size_cap():
    img = jpeg(7)
    big = b"\xff" * 5000
    routes = {
        "/ok.jpg": (200, img, 0.0),
        "/big.jpg": (200, big, 0.0),
        "/slow.jpg": (200, img, 3.0),
        "/error.jpg": (503, b"busy", 0.0),
    }
    with (
        http_server(routes) as base,
        Fetcher(FetchSettings(workers=4, timeout=0.5, retries=1, max_bytes=4096, backoff=0.01)) as f,
    ):
        got = f.fetch_many(
            [
                f"{base}/ok.jpg",
                f"{base}/missing.jpg",
                f"{base}/slow.jpg",
                f"{base}/big.jpg",
                f"{base}/error.jpg",
            ]
        )
        assert got[0] == img
        assert str(got[1]) == f"fetch failed: {base}/missing.jpg: HTTP 404"
        assert got[2].kind == "fetch failed" and "timed out after 0.5s (after 2 tries)" in str(got[2])
        assert got[3].kind == "oversized image" and "5000 bytes, over the limit of 4096" in str(got[3])
        assert "HTTP 503 (after 2 tries)" in str(got[4])


def test_fetcher_refuses_schemes_it_was_not_given(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    with (
        Fetcher(FetchSettings(schemes=("http", "https"))) as f,
        pytest.raises(InvalidImageError, match="scheme file:// not allowed"),
    ):
        f.fetch(str(tmp_path / "a.jpg"))

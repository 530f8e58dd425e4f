"""Build img2dataset-shaped image datasets for tests: real JPEG/PNG bytes, webdataset shards
(``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json``), parquet with a ``jpg`` column, URL lists,
with corrupt members on request; and a loopback HTTP server to fetch URL lists from."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from embedkit.io.fs import get_fs

CAPTIONS = ["a photo of a cat", "a red car", "a dog in the park", "the sun and the moon", "a small tree"]


def image_array(seed: int, height: int = 40, width: int = 48) -> np.ndarray:
    """A smooth random RGB image (compresses like a photo, unlike noise)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((max(2, height // 8), max(2, width // 8), 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def encode(arr: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(seed: int, height: int = 40, width: int = 48) -> bytes:
    return encode(image_array(seed, height, width), "JPEG", quality=90)


@dataclass
class Row:
    """One URL img2dataset tried: ``kind`` is ok (image in the tar), failed (status failed, not in
    the tar), truncated, garbage (not an image), missing (status success but no image in the tar),
    png (a PNG member), big (over a size cap)."""

    key: str
    kind: str = "ok"
    caption: str | None = None
    data: bytes | None = None


def shard_rows(shard: int, kinds: list[str], seed: int = 0) -> list[Row]:
    rows = []
    for i, kind in enumerate(kinds):
        key = f"{shard:05d}{i:04d}"
        caption = CAPTIONS[(seed + i) % len(CAPTIONS)] if i % 4 != 3 else None
        s = seed * 1000 + shard * 100 + i
        data = None
        if kind in ("ok", "missing"):
            data = jpeg(s, 36 + i % 5 * 4, 44 + i % 3 * 6)
        elif kind == "png":
            data = encode(image_array(s), "PNG")
        elif kind == "truncated":
            full = jpeg(s, 64, 64)
            data = full[: len(full) // 2]
        elif kind == "garbage":
            data = b"<html><body>404 Not Found</body></html>"
        elif kind == "big":
            data = encode((np.random.default_rng(s).random((256, 256, 3)) * 255).astype(np.uint8), "PNG")
        rows.append(Row(key, kind, caption, data))
    return rows


def _meta(row: Row, url_base: str) -> dict:
    failed = row.kind == "failed"
    width = height = None
    if row.data is not None and row.kind in ("ok", "png", "missing", "big"):
        with Image.open(io.BytesIO(row.data)) as im:
            width, height = im.size
    return {
        "url": f"{url_base}/{row.key}.jpg",
        "caption": row.caption,
        "key": row.key,
        "status": "failed_to_download" if failed else "success",
        "error_message": "HTTP Error 404: Not Found" if failed else None,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "exif": None if failed else "{}",
        "sha256": None if failed or row.data is None else hashlib.sha256(row.data).hexdigest(),
    }


def _write(url: str, name: str, data: bytes) -> None:
    fs, root = get_fs(url)
    if "://" not in url:
        os.makedirs(root, exist_ok=True)
    with fs.open(f"{root.rstrip('/')}/{name}", "wb") as fh:
        fh.write(data)


def write_webdataset_shard(
    url: str, shard: int, rows: list[Row], *, url_base: str = "http://example.com", unlisted: list[Row] = ()
) -> None:
    """``NNNNN.tar`` (image + txt + json per sample that was downloaded), ``NNNNN.parquet`` (every
    row, failed ones included) and ``NNNNN_stats.json``, as img2dataset writes them. ``unlisted``
    rows go into the tar only (a shard whose parquet lacks some samples)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for row in [*rows, *unlisted]:
            if row.kind == "failed":
                continue
            meta = _meta(row, url_base)
            members = [(f"{row.key}.json", json.dumps(meta).encode())]
            if row.caption is not None:
                members.insert(0, (f"{row.key}.txt", row.caption.encode()))
            if row.kind != "missing":
                ext = "png" if row.kind in ("png", "big") else "jpg"
                members.insert(0, (f"{row.key}.{ext}", row.data or b""))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    _write(url, f"{shard:05d}.tar", buf.getvalue())
    table = pa.Table.from_pylist([_meta(r, url_base) for r in rows])
    sink = io.BytesIO()
    pq.write_table(table, sink)
    _write(url, f"{shard:05d}.parquet", sink.getvalue())
    ok = sum(r.kind != "failed" for r in rows)
    stats = {
        "count": len(rows),
        "successes": ok,
        "failed_to_download": len(rows) - ok,
        "failed_to_resize": 0,
        "start_time": 0.0,
        "end_time": 1.0,
        "status_dict": {"success": ok, "HTTP Error 404: Not Found": len(rows) - ok},
    }
    _write(url, f"{shard:05d}_stats.json", json.dumps(stats).encode())


def write_bytes_parquet(
    url: str, shard: int, rows: list[Row], *, url_base: str = "http://example.com"
) -> None:
    """img2dataset's ``output_format=parquet``: metadata columns plus the image in ``jpg``."""
    recs = []
    for r in rows:
        m = _meta(r, url_base)
        m["jpg"] = None if r.kind in ("failed", "missing") else r.data
        recs.append(m)
    schema = pa.Table.from_pylist(recs).schema.set(len(recs[0]) - 1, pa.field("jpg", pa.binary()))
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(recs, schema=schema), sink)
    _write(url, f"{shard:05d}.parquet", sink.getvalue())


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes, float]] = {}

    def do_GET(self) -> None:  # http.server's method name
        status, body, delay = self.routes.get(self.path, (404, b"not found", 0.0))
        if delay:
            time.sleep(delay)  # the server side of a slow URL, not test synchronisation
        try:
            self.send_response(status)
            self.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args) -> None:
        pass


@contextmanager
def http_server(routes: dict[str, tuple[int, bytes, float]]) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 (random port) answering ``path -> (status, body, delay)``;
    yields its base URL."""
    handler = type("Handler", (_Handler,), {"routes": dict(routes)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

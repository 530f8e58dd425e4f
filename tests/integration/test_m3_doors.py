"""BGE-M3 parity with FlagEmbedding 1.4.2 through every door, not only the Python API: the batch
job's columns (local and Ray engines), the server's ``/embed_sparse``, ``/invocations`` (JSON, npz,
and the runtime surface through boto3) and the client's ``embed_sparse`` / ``embed_multi``.

Each door is compared with FlagEmbedding's own outputs (``m3_reference``: fp32, CPU, max_length
8192, one text a batch) on ``tiny_m3`` and ``tests.reference_m3.M3_TEXTS`` (one token to past 8,192,
truncated there), never with embedkit's engine: dense within 1e-5, the same lexical-weight keys with
weights within 1e-5, ColBERT arrays of the same shapes within 1e-5. One job run per engine and one
server for the module."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkit.cli import main as cli
from embedkit.client import EmbeddingClient
from tests.contract.serving import local_runtime_client
from tests.integration.batch_data import local_ray, read_rejects
from tests.integration.test_m3_batch import read_outputs
from tests.integration.test_m3_server import FAST, LocalServer
from tests.reference_m3 import M3_LONG, M3_TEXTS

pytestmark = pytest.mark.slow  # ~40 s: the reference run, two jobs (one on Ray) and a server on 2 cores

TOL = 1e-5
ALL = {"return_sparse": True, "return_colbert_vecs": True}
NPZ = "application/x-npz"
IDS = [f"m3-{i:02d}" for i in range(len(M3_TEXTS))]
# Texts with nothing but whitespace: the batch job rejects them ("empty text"), as it does in any
# job, so they have no row to compare; every other door answers them.
BLANK = [i for i, t in enumerate(M3_TEXTS) if not t.strip()]


# ------------------------------------------------------------------------------- comparisons
def check_dense(got, ref: dict, rows: list[int], door: str) -> float:
    got = np.asarray(got)
    want = ref["dense_vecs"][rows]
    assert got.dtype == np.float32 and got.shape == want.shape, (door, got.dtype, got.shape)
    worst = float(np.abs(got - want).max())
    assert worst <= TOL, f"{door}: dense differs by {worst}"
    return worst


def check_sparse(got: list[dict], ref: dict, rows: list[int], door: str) -> float:
    assert len(got) == len(rows), door
    worst = 0.0
    for g, i in zip(got, rows, strict=True):
        w = ref["lexical_weights"][i]
        assert all(isinstance(k, str) for k in g), f"{door}: text {i}: keys must be token ids as str"
        assert set(g) == set(w), f"{door}: text {i} {M3_TEXTS[i][:40]!r}: {sorted(set(g) ^ set(w))[:10]}"
        worst = max(worst, max((abs(float(g[k]) - w[k]) for k in w), default=0.0))
    assert worst <= TOL, f"{door}: lexical weights differ by {worst}"
    return worst


def check_colbert(got: list, ref: dict, rows: list[int], door: str) -> float:
    assert len(got) == len(rows), door
    worst = 0.0
    for g, i in zip(got, rows, strict=True):
        g, w = np.asarray(g), ref["colbert_vecs"][i]
        assert g.dtype == np.float32 and g.shape == w.shape, f"{door}: text {i}: {g.shape} vs {w.shape}"
        worst = max(worst, float(np.abs(g - w).max(initial=0.0)))
    assert worst <= TOL, f"{door}: ColBERT vectors differ by {worst}"
    return worst


def check_all(got: dict, ref: dict, rows: list[int], door: str) -> None:
    """``got`` as FlagEmbedding's dict (dense_vecs, lexical_weights, colbert_vecs) for ``rows``."""
    worst = (
        check_dense(got["dense_vecs"], ref, rows, door),
        check_sparse(got["lexical_weights"], ref, rows, door),
        check_colbert(got["colbert_vecs"], ref, rows, door),
    )
    print(f"{door}: max |diff| dense {worst[0]:.2e}, sparse {worst[1]:.2e}, colbert {worst[2]:.2e}")


def lexical(ids, weights) -> dict[str, float]:
    return {str(int(i)): float(w) for i, w in zip(ids, weights, strict=True)}


def from_npz(content: bytes) -> dict:
    """An ``application/x-npz`` answer as FlagEmbedding's dict (the offsets split the rows)."""
    z = np.load(io.BytesIO(content), allow_pickle=False)
    cuts = z["sparse_offsets"][1:-1]
    return {
        "dense_vecs": z["dense"],
        "lexical_weights": [
            lexical(i, w)
            for i, w in zip(np.split(z["sparse_ids"], cuts), np.split(z["sparse_weights"], cuts), strict=True)
        ],
        "colbert_vecs": np.split(z["colbert"], z["colbert_offsets"][1:-1]),
    }


def from_json(body: dict) -> dict:
    return {
        "dense_vecs": np.asarray(body["embeddings"], np.float32),
        "lexical_weights": body["lexical_weights"],
        "colbert_vecs": [np.asarray(c, np.float32) for c in body["colbert_vecs"]],
    }


# ----------------------------------------------------------------------------------- batch job
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("m3-doors-in") / "texts.parquet"
    pq.write_table(pa.table({"key": IDS, "text": M3_TEXTS}), path, row_group_size=8)
    return str(path)


def _job(dataset: str, out, tiny_m3, *extra: str) -> dict:
    argv = ["embed", dataset, str(out), "--model", str(tiny_m3), "--outputs", "dense,sparse,colbert"]
    argv += ["--dtype", "float32", "--unit-rows", "8", "--progress", "none", *extra]
    assert cli(argv) == 0
    return read_outputs(out)


def check_job(rows: dict, out, ref: dict, door: str) -> None:
    kept = [i for i in range(len(M3_TEXTS)) if i not in BLANK]
    assert sorted(rows) == [IDS[i] for i in kept], door
    assert sorted((r["id"], r["reason"]) for r in read_rejects(str(out))) == [
        (IDS[i], "empty text") for i in BLANK
    ]
    got = [rows[IDS[i]] for i in kept]
    check_all(
        {
            "dense_vecs": np.stack([r["dense"] for r in got]),
            "lexical_weights": [lexical(*r["sparse"]) for r in got],
            "colbert_vecs": [r["colbert"] for r in got],
        },
        ref,
        kept,
        door,
    )


def test_the_batch_jobs_columns_match_flagembedding(dataset, tiny_m3, m3_reference, tmp_path):
    out = tmp_path / "local"
    check_job(_job(dataset, out, tiny_m3), out, m3_reference, "batch job (local)")


def test_the_ray_engines_columns_match_flagembedding(dataset, tiny_m3, m3_reference, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'embedkit[ray]')")
    out = tmp_path / "ray"
    with local_ray():
        rows = _job(dataset, out, tiny_m3, "--engine", "ray", "--num-workers", "1")
    check_job(rows, out, m3_reference, "batch job (ray)")


# -------------------------------------------------------------------------------------- server
EVERY = list(range(len(M3_TEXTS)))


@pytest.fixture(scope="module")
def server(tiny_m3):
    with LocalServer(tiny_m3) as srv:
        yield srv


@pytest.fixture
def http(server):
    client = httpx.Client(base_url=server.url, timeout=120)  # the long inputs take seconds on 2 cores
    yield client
    client.close()


def test_embed_sparse_matches_flagembedding(http, m3_reference):
    # TEI's truncate defaults to false (an input over 8,192 tokens is a 400): ask for it
    r = http.post("/embed_sparse", json={"inputs": M3_TEXTS, "truncate": True})
    assert r.status_code == 200, r.text
    got = [{str(e["index"]): e["value"] for e in item} for item in r.json()]
    worst = check_sparse(got, m3_reference, EVERY, "/embed_sparse")
    print(f"/embed_sparse: max |diff| sparse {worst:.2e}")
    over = http.post("/embed_sparse", json={"inputs": [M3_TEXTS[M3_LONG[-1]]]})
    assert over.status_code == 400  # as TEI: not truncated unless asked


def test_invocations_json_matches_flagembedding(http, m3_reference):
    r = http.post("/invocations", json={"inputs": M3_TEXTS, "parameters": ALL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["embeddings", "lexical_weights", "colbert_vecs"]
    check_all(from_json(body), m3_reference, EVERY, "/invocations JSON")


def test_invocations_npz_matches_flagembedding(http, m3_reference):
    r = http.post("/invocations", json={"inputs": M3_TEXTS, "parameters": ALL}, headers={"Accept": NPZ})
    assert r.status_code == 200 and r.headers["content-type"] == NPZ, r.text
    check_all(from_npz(r.content), m3_reference, EVERY, "/invocations npz")


def test_the_runtime_surface_through_boto3_matches_flagembedding(server, m3_reference):
    client = local_runtime_client(server.url)
    body = json.dumps({"inputs": M3_TEXTS, "parameters": ALL})
    out = client.invoke_endpoint(EndpointName="x", ContentType="application/json", Body=body)
    check_all(from_json(json.loads(out["Body"].read())), m3_reference, EVERY, "runtime JSON (boto3)")
    out = client.invoke_endpoint(EndpointName="x", ContentType="application/json", Accept=NPZ, Body=body)
    assert out["ContentType"] == NPZ
    check_all(from_npz(out["Body"].read()), m3_reference, EVERY, "runtime npz (boto3)")


# -------------------------------------------------------------------------------------- client
def test_the_client_matches_flagembedding(server, m3_reference):
    with EmbeddingClient(endpoint_url=server.url, contract="hf", max_batch=8, **FAST) as c:
        worst = check_sparse(c.embed_sparse(M3_TEXTS), m3_reference, EVERY, "client embed_sparse")
        print(f"client embed_sparse: max |diff| sparse {worst:.2e}")
        check_all(c.embed_multi(M3_TEXTS), m3_reference, EVERY, "client embed_multi")
